"""What every command gets through ``ctx.obj``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class AppContext:
    registry_path: str | None = None
    debug: bool = False
    _registry: object = None

    @property
    def registry_home(self) -> Path:
        from ..paths import registry_home

        return registry_home(self.registry_path)

    def registry(self):
        """Open (and create on first use) the registry; imported lazily."""
        if self._registry is None:
            from ..registry import open_registry

            self._registry = open_registry(self.registry_home)
        return self._registry
