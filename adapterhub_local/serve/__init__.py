"""Serving: predict what vLLM, SGLang or LoRAX does with an adapter, and convert what can be served.

`check` (read-only, no torch) applies the rules table in `rules.py`; `convert` writes an
adapter the server loads with the ΔW PEFT serves, or refuses by name.
"""

from __future__ import annotations

from .check import CheckResult, Problem, check, serving_summary
from .rules import PROFILES, get_profile

__all__ = ["PROFILES", "CheckResult", "Problem", "check", "convert", "get_profile", "serving_summary"]


def convert(*args, **kwargs):
    """See `adapterhub_local.serve.convert.convert` (imported lazily: it needs torch)."""
    from .convert import convert as _convert

    return _convert(*args, **kwargs)
