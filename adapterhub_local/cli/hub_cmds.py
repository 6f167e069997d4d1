"""`adapters` verbs for the hub area (filled in by its issue)."""

from __future__ import annotations

COMMANDS: list = []
