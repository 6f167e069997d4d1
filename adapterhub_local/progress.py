"""Progress bars on stderr, only when stderr is a terminal (quiet in scripts and CI)."""

from __future__ import annotations

import os
import sys


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def enabled() -> bool:
    if os.environ.get("ADAPTERS_PROGRESS") == "1":
        return True
    if os.environ.get("ADAPTERS_PROGRESS") == "0":
        return False
    return sys.stderr.isatty()


class _Quiet:
    """What ``bar`` returns when bars are off: tqdm's methods that we call, doing nothing
    (``write`` still prints), so scripts and CI never import tqdm (~0.1 s of start-up)."""

    def update(self, n: float = 1) -> None:
        pass

    def set_postfix(self, *args, **kw) -> None:
        pass

    def close(self) -> None:
        pass

    def write(self, s: str, file=None, end: str = "\n") -> None:
        print(s, file=file or sys.stdout, end=end)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def bar(total=None, desc: str = "", unit: str = "it", **kw):
    if not enabled():
        return _Quiet()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled(), file=sys.stderr,
                dynamic_ncols=True, leave=False, **kw)
