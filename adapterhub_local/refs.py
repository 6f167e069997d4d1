"""Turn a user's REF into an adapter folder: a path, or `name`, `name@3`, `name:prod`."""

from __future__ import annotations

import os
from pathlib import Path


def looks_like_path(ref: str) -> bool:
    return os.sep in ref or ref.startswith(".") or Path(ref).exists()


def resolve_adapter(ref: str, registry_home: str | os.PathLike | None = None):
    """(folder, version record or None). A path wins over a registry name.

    Registry references are materialised by the registry as a verified PEFT folder.
    """
    path = Path(ref).expanduser()
    if path.exists():
        return path, None
    if looks_like_path(ref):
        from .errors import InvalidAdapter

        raise InvalidAdapter(ref, "no such file or directory")
    from .paths import registry_home as home
    from .registry import open_registry

    reg = open_registry(home(registry_home))
    record = reg.resolve(ref)
    return reg.adapter_path(record), record
