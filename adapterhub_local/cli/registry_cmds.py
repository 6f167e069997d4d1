"""`adapters` verbs for the registry area (filled in by its issue)."""

from __future__ import annotations

COMMANDS: list = []
