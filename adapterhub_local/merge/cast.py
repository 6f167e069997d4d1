"""Float32 add-and-cast for merges: out = round_to_nearest_even(float32(src) + delta).

One fused pass in C (adapterhub_local._kernels) when it was built; otherwise the
numpy fallback below, which gives the same bits (tests compare both, and both
with torch's casts). bfloat16 is handled as uint16 bits, so no torch is needed.
"""

from __future__ import annotations

import numpy as np

from ..safetensors_io import DTYPES

try:
    from .. import _kernels
except ImportError:  # the optional extension did not build: the numpy fallback
    _kernels = None
if _kernels is not None and not hasattr(_kernels, "TILE"):  # built from an older _kernels.c
    _kernels = None  # (test_kernels fails: rebuild with pip install -e .)

# The C kernel's layout, read from the extension (not repeated here): TILE columns per tile of
# the packed right factor, its register tile; ROWS rows per pass, blocks are cut at multiples
# of it. Without the extension the numpy fallback packs the same way; its bits depend on
# neither number (each value is one fma chain in rank order).
TILE, ROWS = (_kernels.TILE, _kernels.ROWS) if _kernels is not None else (16, 6)
assert TILE > 0 and ROWS > 0, "the C kernel exported a nonsensical layout"

KINDS = ("BF16", "F16", "F32")
# the float dtypes as numpy reads their bytes (BF16 as its raw bits), from the one dtype table
NP_DTYPE = {k: np.dtype(np.uint16 if k == "BF16" else DTYPES[k].numpy) for k in ("BF16", "F16", "F32", "F64")}


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


def pack_right(right: np.ndarray) -> np.ndarray:
    """(rank, cols) float32 -> tiles of 16 columns, [tile][k][16], zero-padded: the layout
    lowrank_add_cast reads, so one tile's factors are contiguous."""
    rank, cols = right.shape
    tiles = -(-cols // TILE)
    padded = np.zeros((rank, tiles * TILE), dtype=np.float32)
    padded[:, :cols] = right
    return np.ascontiguousarray(padded.reshape(rank, tiles, TILE).transpose(1, 0, 2))


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fma(a, b, c), correctly rounded, in numpy: a·b is exact in float64; the sum
    rounded to float64 is then rounded to float32 exactly right unless it landed on a float32
    midpoint that the exact sum (s + e, e from TwoSum) is not on, which is fixed by e's sign."""
    p = a.astype(np.float64) * b.astype(np.float64)
    c64 = c.astype(np.float64)
    s = p + c64
    bb = s - p
    e = (p - (s - bb)) + (c64 - bb)
    r = s.astype(np.float32)
    r64 = r.astype(np.float64)
    other = np.nextafter(r, np.where(s > r64, np.float32(np.inf), np.float32(-np.inf)))
    tie = (r64 != s) & (s == (r64 + other.astype(np.float64)) * 0.5) & (e != 0)
    if tie.any():
        fix = np.where(e > 0, np.maximum(r, other), np.minimum(r, other))
        r = np.where(tie, fix, r)
    return r


def _numpy_lowrank_add_cast(src, src_dtype: str, left, packed, rank: int, out, out_dtype: str) -> int:
    left = np.asarray(left, dtype=np.float32).reshape(-1, rank)
    tiles = np.asarray(packed, dtype=np.float32).reshape(-1, rank, TILE)
    right = tiles.transpose(1, 0, 2).reshape(rank, -1)
    rows = left.shape[0]
    n = memoryview(out).nbytes // (4 if out_dtype == "F32" else 2)
    cols = n // rows if rows else 0
    right = right[:, :cols]
    acc = np.zeros((rows, cols), dtype=np.float32)
    with np.errstate(all="ignore"):
        for k in range(rank):  # fma chain in rank order, from 0: the C kernel's order
            acc = _fma(left[:, k : k + 1], right[k : k + 1, :], acc)
    return _numpy_add_cast(src, src_dtype, acc.reshape(-1), out, out_dtype)


def lowrank_add_cast(src, src_dtype: str, left: np.ndarray, packed: np.ndarray, rank: int, out,
                     out_dtype: str) -> int:
    """out = cast(float32(src) + left @ right) for a block of rows, ``packed`` = pack_right(right).
    Every product value is an fma chain in rank order, so the bits do not depend on block
    sizes or threads; C and the numpy fallback agree bit for bit. Returns the non-finite count."""
    if _kernels is not None:
        return _kernels.lowrank_add_cast(src, src_dtype, left, packed, rank, out, out_dtype)
    if src_dtype not in KINDS or out_dtype not in KINDS:
        raise ValueError(f"unsupported dtype pair {src_dtype} -> {out_dtype}")
    return _numpy_lowrank_add_cast(src, src_dtype, left, packed, rank, out, out_dtype)


def row_norms(x: np.ndarray) -> np.ndarray:
    """float32 ‖row‖ of a float32 (rows, cols) array, summed as the C kernel's dora_rows_cast sums."""
    rows, cols = x.shape
    lanes = np.zeros((rows, -(-cols // 8) * 8), dtype=np.float64)
    lanes[:, :cols] = x
    lanes *= lanes  # exact: a float32 square fits in float64
    lanes = lanes.reshape(rows, -1, 8)
    acc = np.zeros((rows, 8), dtype=np.float64)
    for k in range(lanes.shape[1]):  # each lane in column order, as the C loop
        acc += lanes[:, k, :]
    ss = ((acc[:, 0] + acc[:, 1]) + (acc[:, 2] + acc[:, 3])) + ((acc[:, 4] + acc[:, 5]) + (acc[:, 6] + acc[:, 7]))
    return np.sqrt(ss).astype(np.float32)


def _numpy_dora_rows_cast(t, rows: int, mag, out, out_dtype: str) -> int:
    n = memoryview(out).nbytes // (4 if out_dtype == "F32" else 2)
    x = np.frombuffer(t, dtype=np.float32, count=n).reshape(rows, n // rows)
    with np.errstate(all="ignore"):
        f = np.asarray(mag, dtype=np.float32)[:rows] / row_norms(x)
        v = (x * f[:, None]).astype(np.float32).reshape(-1)
    return _numpy_add_cast(v, "F32", None, out, out_dtype)


def dora_rows_cast(t, rows: int, mag, out, out_dtype: str) -> int:
    """DoRA's row scaling of a float32 block ``t`` (rows x cols): out = cast(t · m/‖t‖), the norm
    per row summed in float64 over 8 lanes in a fixed order, so C and numpy agree bit for bit
    (merge/dora.py). Returns the non-finite count."""
    if _kernels is not None and hasattr(_kernels, "dora_rows_cast"):
        return _kernels.dora_rows_cast(t, rows, mag, out, out_dtype)
    if out_dtype not in KINDS:
        raise ValueError(f"unsupported output dtype {out_dtype}")
    return _numpy_dora_rows_cast(t, rows, mag, out, out_dtype)
