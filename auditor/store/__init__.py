"""Persistence: the schema (`tables`, Core only), every read defined once (`queries`), the writes (`writes`,
`leases`, `outbox`, `pruning`), engine set-up and migrations (`engine`), and where statements run (`repo`: the async
`Store`, the synchronous `Reader`, a `Transaction`)."""

from __future__ import annotations
