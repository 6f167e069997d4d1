"""The dense merge methods' kernels: numpy, float32 data, float64 sums, one module at a time.

``ties``, ``dare_*`` and ``magnitude_prune`` need each input's dense ΔWᵢ (an MLP module of
a 1B model: 5632×2048, 46 MB in float32). Everything here is O(n) passes over such
arrays plus a few thin GEMMs, so ``algebra._each_module`` runs the modules on a thread
per core with ONE BLAS thread each:

* top-k magnitude: the k-th largest |x| by ``np.partition`` (O(n), no sort); entries
  equal to it are kept by position, first ones first, so the result is the one a
  stable sort by -|x| gives.
* TIES: the sign election and the |w|-normalised sum of agreeing entries in place.
* the truncation to ``rank``: a full SVD (float64) when the smaller side is at most
  ``EXACT_SVD_MAX`` or the rank is over a quarter of it, else a seeded randomised range
  finder (Halko, Martinsson & Tropp 2011, alg. 4.4: rank + 16 directions, four power
  iterations, re-orthonormalised each pass) in float32. Its test matrix comes from a
  generator seeded by (seed, module), and BLAS runs on one thread, so the result does
  not depend on thread count or processing order.
* the report's figures (‖exact‖², ‖exact − result‖², ‖exact − combined‖², ‖combined‖²)
  are taken in float64 over row chunks of the exact sum B·A: nothing the size of
  a float64 ΔW is held.
"""

from __future__ import annotations

import hashlib

import numpy as np

EXACT_SVD_MAX = 1024
OVERSAMPLE = 16
POWER_ITERS = 4
CHUNK_ROWS = 256


def module_seed(seed: int, module: str) -> int:
    digest = hashlib.sha256(f"{int(seed)}\0{module}\0svd".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def prune(x: np.ndarray, density: float) -> np.ndarray:
    """Keep the round(density·n) largest-magnitude entries (ties by position), zero the rest."""
    n = x.size
    k = round(density * n)
    if k >= n:
        return x.copy()
    if k <= 0:
        return np.zeros_like(x)
    flat = x.reshape(-1)
    mag = np.abs(flat)
    thr = np.partition(mag, n - k)[n - k]
    keep = mag > thr
    need = k - int(np.count_nonzero(keep))
    if need > 0:
        keep[np.flatnonzero(mag == thr)[:need]] = True
    return np.where(keep, flat, 0).astype(x.dtype, copy=False).reshape(x.shape)


def ties(pruned: list[np.ndarray], weights: list[float], own: bool = False) -> np.ndarray:
    """Sign election by weighted mass, then the |w|-normalised sum of the agreeing entries.

    With σ = sign(Σ wᵢxᵢ) ∈ {-1, 0, 1}, wᵢxᵢ agrees exactly when wᵢxᵢ·σ > 0 (a product by ±1
    is exact), and the sum of the agreeing entries is σ·Σ max(wᵢxᵢ·σ, 0). ``own``: the arrays
    are scratch (scaled in place)."""
    if own:
        weighted = [np.multiply(p, p.dtype.type(w), out=p) for p, w in zip(pruned, weights)]
    else:
        weighted = [p * p.dtype.type(w) for p, w in zip(pruned, weights)]
    sign = weighted[0].copy()
    for wt in weighted[1:]:
        sign += wt
    np.sign(sign, out=sign)
    num = np.zeros_like(sign)
    den = np.zeros_like(sign)
    signed = np.empty_like(sign)
    for wt, w in zip(weighted, weights):
        np.multiply(wt, sign, out=signed)
        den += (signed > 0) * den.dtype.type(abs(w))
        np.maximum(signed, 0, out=signed)
        num += signed
    num *= sign
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den > 0)
    return out


def weighted_sum(arrays: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Σ wᵢ·xᵢ; the xᵢ are scratch (scaled in place)."""
    out = np.zeros_like(arrays[0])
    for x, w in zip(arrays, weights):
        out += np.multiply(x, x.dtype.type(w), out=x)
    return out


def dare(x: np.ndarray, density: float, keep: np.ndarray | None) -> np.ndarray:
    """Entries where ``keep`` rescaled by 1/density, the rest zero (``keep`` from a seeded draw)."""
    if density >= 1:
        return x.copy()
    if density <= 0 or keep is None:
        return np.zeros_like(x)
    return np.where(keep, x / density, 0).astype(x.dtype, copy=False)


def _orthonormal(y: np.ndarray) -> np.ndarray:
    return np.linalg.qr(y)[0]


def truncate(d: np.ndarray, rank: int, seed: int, module: str):
    """(A' (k, in), B' (out, k), kept energy, Σ S² of the SVD that ran or None): d ≈ B'·A'."""
    m = min(d.shape)
    if m <= EXACT_SVD_MAX or rank * 4 > m:
        u, s, vh = np.linalg.svd(d.astype(np.float64), full_matrices=False)
        total = float(np.sum(s**2))
    else:
        rng = np.random.default_rng(module_seed(seed, module))
        q = min(m, rank + OVERSAMPLE)
        d32 = d.astype(np.float32, copy=False)
        y = _orthonormal(d32 @ rng.standard_normal((d.shape[1], q), dtype=np.float32))
        for _ in range(POWER_ITERS):
            y = _orthonormal(d32 @ _orthonormal(d32.T @ y))
        ub, s, vh = np.linalg.svd((y.T @ d32).astype(np.float64), full_matrices=False)
        u = y.astype(np.float64) @ ub
        total = None
    k = max(0, min(rank, int(s.size)))
    root = np.sqrt(s[:k])
    b = (u[:, :k] * root).astype(np.float32)
    a = (root[:, None] * vh[:k]).astype(np.float32)
    return a, b, float(np.sum(s[:k] ** 2)), total


def figures(a: np.ndarray, b: np.ndarray, combined: np.ndarray, a_out: np.ndarray, b_out: np.ndarray):
    """(‖E‖², ‖E − B'A'‖², ‖E − D‖², ‖D‖²) in float64, E = b @ a the exact sum, D ``combined``,
    over row chunks (the float64 E is never whole)."""
    a64, ao64 = a.astype(np.float64), a_out.astype(np.float64)
    exact_sq = err_sq = method_sq = dense_sq = 0.0
    for i in range(0, combined.shape[0], CHUNK_ROWS):
        j = i + CHUNK_ROWS
        e = b[i:j].astype(np.float64) @ a64
        dc = combined[i:j].astype(np.float64)
        exact_sq += float(np.vdot(e, e))
        dense_sq += float(np.vdot(dc, dc))
        diff = e - dc
        method_sq += float(np.vdot(diff, diff))
        np.subtract(e, b_out[i:j].astype(np.float64) @ ao64, out=e)
        err_sq += float(np.vdot(e, e))
    return exact_sq, err_sq, method_sq, dense_sq
