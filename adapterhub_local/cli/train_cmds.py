"""`adapters` verbs for the train area (filled in by its issue)."""

from __future__ import annotations

COMMANDS: list = []
