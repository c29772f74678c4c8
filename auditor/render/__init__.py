"""Renderings of what the service returns: CSV, Markdown and HTML of the current report, the period report and
the evidence export. Pure functions of the JSON documents (plain dicts) the use cases build: the domain, the
standard library and Jinja2 only, never the store or the service (import-linter checks it). The CLI, the API, the
dashboard and the evidence export import them.
"""
