"""Where things live on disk: the registry home and our cache dir."""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "ADAPTERS_HOME"


def _xdg(var: str, default: str) -> Path:
    base = os.environ.get(var)
    return Path(base) if base else Path.home() / default


def registry_home(explicit: str | os.PathLike | None = None) -> Path:
    """`--registry PATH`, else `$ADAPTERS_HOME`, else the XDG data dir. Not created here."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    return _xdg("XDG_DATA_HOME", ".local/share") / "adapterhub-local"


def cache_dir() -> Path:
    """Our cache (fingerprints, demo base model); created on first use."""
    env = os.environ.get("ADAPTERS_CACHE")
    path = Path(env) if env else _xdg("XDG_CACHE_HOME", ".cache") / "adapterhub-local"
    path.mkdir(parents=True, exist_ok=True)
    return path
