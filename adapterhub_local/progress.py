"""Progress bars on stderr, only when stderr is a terminal (quiet in scripts and CI)."""

from __future__ import annotations

import os
import sys


def enabled() -> bool:
    if os.environ.get("ADAPTERS_PROGRESS") == "1":
        return True
    if os.environ.get("ADAPTERS_PROGRESS") == "0":
        return False
    return sys.stderr.isatty()


def bar(total=None, desc: str = "", unit: str = "it", **kw):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled(), file=sys.stderr,
                dynamic_ncols=True, leave=False, **kw)
