"""Float32 add-and-cast for merges: out = round_to_nearest_even(float32(src) + delta).

One fused pass in C (adapterhub_local._kernels) when it was built; otherwise the
numpy fallback below, which gives the same bits (tests compare both, and both
with torch's casts). bfloat16 is handled as uint16 bits, so no torch is needed.
"""

from __future__ import annotations

import numpy as np

try:
    from .. import _kernels
except ImportError:  # the optional extension did not build: the numpy fallback
    _kernels = None

KINDS = ("BF16", "F16", "F32")
NP_DTYPE = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64}


def to_f32(raw, dtype: str) -> np.ndarray:
    """A new float32 array from raw bytes (or an array) holding ``dtype`` values."""
    if dtype == "BF16":
        bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32)
        return (bits << 16).view(np.float32)
    if dtype not in NP_DTYPE:
        raise ValueError(f"not a floating dtype: {dtype}")
    return np.frombuffer(raw, dtype=NP_DTYPE[dtype]).astype(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round to nearest, ties to even; NaN -> 0x7fc0 (as the C kernel)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        r[nan] = 0x7FC0
    return r


def f32_to_f16_bits(x: np.ndarray) -> np.ndarray:
    """numpy's float16 cast (ties to even, subnormals); a NaN keeps its sign and top payload
    bits and is made quiet, as the C kernel (and x86's vcvtps2ph) does."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        r = x.astype(np.float16).view(np.uint16)
    u = x.view(np.uint32)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        r = r.copy()
        r[nan] = (((u[nan] >> 16) & 0x8000) | 0x7E00 | ((u[nan] >> 13) & 0x3FF)).astype(np.uint16)
    return r


def _numpy_add_cast(src, src_dtype: str, delta, out, out_dtype: str) -> int:
    n = memoryview(out).nbytes // (4 if out_dtype == "F32" else 2)
    v = to_f32(memoryview(src).cast("B")[: n * (4 if src_dtype == "F32" else 2)], src_dtype)
    if delta is not None:
        with np.errstate(all="ignore"):
            v = v + np.frombuffer(delta, dtype=np.float32, count=n)
    dst = np.frombuffer(out, dtype=np.uint8).view(np.float32 if out_dtype == "F32" else np.uint16)
    if out_dtype == "F32":
        dst[:] = v
        bits, mask = v.view(np.uint32), 0x7F800000
    else:
        bits = f32_to_bf16_bits(v) if out_dtype == "BF16" else f32_to_f16_bits(v)
        dst[:] = bits
        mask = 0x7F80 if out_dtype == "BF16" else 0x7C00
    return int(np.count_nonzero((bits & mask) == mask))


def add_cast(src, src_dtype: str, delta, out, out_dtype: str) -> int:
    """out[i] = cast(float32(src[i]) + delta[i]) over every element of ``out``; ``delta`` may be
    None (a plain conversion). dtypes: 'BF16', 'F16', 'F32'. Returns the count of non-finite
    outputs. The C kernel releases the GIL while it runs."""
    if _kernels is not None:
        return _kernels.add_cast(src, src_dtype, delta, out, out_dtype)
    if src_dtype not in KINDS or out_dtype not in KINDS:
        raise ValueError(f"unsupported dtype pair {src_dtype} -> {out_dtype}")
    return _numpy_add_cast(src, src_dtype, delta, out, out_dtype)


def have_c_kernel() -> bool:
    return _kernels is not None
