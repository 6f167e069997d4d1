"""`adapters` verbs for the merge area (filled in by its issue)."""

from __future__ import annotations

COMMANDS: list = []
