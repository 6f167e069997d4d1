"""`adapters` verbs for the demo area (filled in by its issue)."""

from __future__ import annotations

COMMANDS: list = []
