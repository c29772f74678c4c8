"""Domain objects, compliance rules and the findings lifecycle. Standard library only."""

from __future__ import annotations
