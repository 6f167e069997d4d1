"""How many threads numpy's BLAS (OpenBLAS) may use, set for the length of a merge.

OpenBLAS reads OPENBLAS_NUM_THREADS once, when numpy is imported; afterwards only its
``openblas_set_num_threads`` changes it. numpy does not expose that, so we find the
loaded OpenBLAS library and call it (ctypes, Linux / macOS). If there is none (another
BLAS, an unusual build), nothing changes: this is a speed setting, never a result one.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

_API: tuple | None = None


def _openblas():
    """(set_num_threads, get_num_threads) of the OpenBLAS numpy uses, or None."""
    global _API
    if _API is not None:
        return _API or None
    _API = ()
    import numpy as np  # noqa: F401  (loads the BLAS library we look for)

    paths = []
    with contextlib.suppress(OSError):
        with open("/proc/self/maps") as fh:
            paths = sorted({ln.split()[-1] for ln in fh if "openblas" in ln.lower() and "/" in ln})
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                s, g = f"{prefix}_set_num_threads{suffix}", f"{prefix}_get_num_threads{suffix}"
                if hasattr(lib, s) and hasattr(lib, g):
                    set_, get = getattr(lib, s), getattr(lib, g)
                    set_.argtypes, set_.restype, get.restype = [ctypes.c_int], None, ctypes.c_int
                    _API = (set_, get)
                    return _API
    return None


@contextlib.contextmanager
def blas_threads(n: int):
    """Run the block with ``n`` BLAS threads (0: one per core); restore the old count after.
    An explicit OPENBLAS_NUM_THREADS in the environment wins."""
    api = None if "OPENBLAS_NUM_THREADS" in os.environ else _openblas()
    if api is None:
        yield
        return
    set_, get = api
    old = get()
    set_(n or os.cpu_count() or 1)
    try:
        yield
    finally:
        set_(old)
