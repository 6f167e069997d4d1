"""The dense methods' kernels (merge/dense.py) against independent computations."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from adapterhub_local.merge import dense


def test_prune_keeps_the_k_largest_ties_by_position():
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, size=(9, 7)).astype(np.float32)  # many equal magnitudes
    for density in (0.0, 0.2, 0.5, 0.77, 1.0):
        k = round(density * x.size)
        order = sorted(range(x.size), key=lambda i: -abs(float(x.flat[i])))[:k]  # stable: by position
        want = np.zeros_like(x)
        want.flat[order] = x.flat[order]
        got = dense.prune(x, density)
        assert got.dtype == x.dtype and np.array_equal(got, want), density


def _spectrum_matrix(m, n, seed=0):
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((m, 64)))[0]
    v = np.linalg.qr(rng.standard_normal((n, 64)))[0]
    s = 0.8 ** np.arange(64)
    return ((u * s) @ v.T + 1e-4 * rng.standard_normal((m, n))).astype(np.float32)


def test_randomised_truncation_is_near_optimal_and_seeded(monkeypatch):
    monkeypatch.setattr(dense, "EXACT_SVD_MAX", 256)  # the randomised path, on a small matrix
    d = _spectrum_matrix(300, 400)
    with threadpool_limits(1, user_api="blas"):  # as algebra._each_module runs it
        a, b, kept, total = dense.truncate(d, 16, seed=3, module="m")
    assert total is None and a.shape == (16, 400) and b.shape == (300, 16)
    s = np.linalg.svd(d.astype(np.float64), compute_uv=False)
    assert kept == pytest.approx(float(np.sum(s[:16] ** 2)), rel=1e-4)  # the top-16 energy
    approx = b.astype(np.float64) @ a.astype(np.float64)
    assert float(np.sum(approx**2)) == pytest.approx(kept, rel=1e-4)  # orthonormal factors: ‖B'A'‖² = Σ S²
    err = float(np.sum((d - approx) ** 2))
    assert err == pytest.approx(float(np.sum(s[16:] ** 2)), rel=1e-2)  # the optimal error (Eckart–Young)
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(2) as pool:  # two at once: the same bits
        runs = list(pool.map(lambda m: dense.truncate(d, 16, seed=3, module=m), ["m", "m", "n"]))
    for again in runs[:2]:
        assert np.array_equal(again[0], a) and np.array_equal(again[1], b)
    assert not np.array_equal(runs[2][0], a)  # the test matrix is drawn per (seed, module)
    other = dense.truncate(d, 16, seed=4, module="m")
    assert not np.array_equal(other[0], a)


def test_figures_match_dense_float64():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((12, 300)).astype(np.float32)
    b = rng.standard_normal((600, 12)).astype(np.float32)
    d = (b @ a + 0.1 * rng.standard_normal((600, 300))).astype(np.float32)
    a2, b2, _, _ = dense.truncate(d, 4, 0, "x")
    e = b.astype(np.float64) @ a.astype(np.float64)
    want = (np.sum(e**2), np.sum((e - b2.astype(np.float64) @ a2.astype(np.float64)) ** 2),
            np.sum((e - d) ** 2), np.sum(d.astype(np.float64) ** 2))
    assert dense.figures(a, b, d, a2, b2) == pytest.approx(want, rel=1e-10)
