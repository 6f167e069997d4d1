"""The fused add-and-cast kernel: C, the numpy fallback and torch's casts agree bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapterhub_local.merge import cast

EDGES = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan,
                  3.4028235e38, -3.4028235e38, 65504.0, 65519.99, 65520.0, -65520.0, 70000.0,
                  6.1035156e-05, 6.0975552e-05, 5.9604645e-08, 2.9802322e-08, 2.9802326e-08,
                  8.940697e-08, 1e-40, -1e-40, 1.1754944e-38, 3.3895314e38, 3.3961776e38],
                 dtype=np.float32)


def _ties() -> np.ndarray:
    """Values exactly halfway between two bfloat16 / float16 neighbours (both parities)."""
    rng = np.random.default_rng(1)
    top = rng.integers(0, 2**15, 2000, dtype=np.uint32) << 16
    bf16_ties = top | np.uint32(0x8000)
    f16 = rng.integers(0, 0x7BFF, 2000).astype(np.uint16).view(np.float16).astype(np.float32).view(np.uint32)
    f16_ties = f16 + np.uint32(0x1000)  # half of a float16 mantissa step, for normal values
    sub = (rng.integers(0, 1023, 500).astype(np.float32) + 0.5) * np.float32(2.0**-24)  # subnormal ties
    return np.concatenate([bf16_ties.view(np.float32), f16_ties.view(np.float32), sub, -sub])


def _random(n=200_000, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)  # every exponent, NaNs included
    normal = rng.standard_normal(n).astype(np.float32) * np.float32(0.02)
    return np.concatenate([bits.view(np.float32), normal, EDGES, _ties()])


def _torch_bits(x: np.ndarray, dtype) -> np.ndarray:
    t = torch.from_numpy(x.copy()).to(dtype)
    return t.view(torch.int16).numpy().view(np.uint16)


def _run(fn, src: np.ndarray, src_dtype: str, delta, out_dtype: str):
    out = np.empty(len(src) * (4 if out_dtype == "F32" else 2), dtype=np.uint8)
    bad = fn(src, src_dtype, delta, out, out_dtype)
    return out.view(np.float32 if out_dtype == "F32" else np.uint16), bad


IMPLS = [pytest.param(cast._numpy_add_cast, id="numpy")]
if cast.have_c_kernel():
    IMPLS.insert(0, pytest.param(cast._kernels.add_cast, id="c"))


def test_the_c_kernel_was_built():
    """A fresh `pip install -e .` builds it (gcc and Python headers are present where we test)."""
    from adapterhub_local import safetensors_io

    assert cast.have_c_kernel(), "no C kernel, or a stale one: rebuild it with `pip install -e .`"
    assert safetensors_io._kernels_scan() is not None, "a stale C kernel: rebuild it with `pip install -e .`"


def test_the_layout_comes_from_the_c_kernel():
    """TILE and ROWS are the extension's own constants; the merge cuts blocks at its row group."""
    from adapterhub_local.merge import stream

    assert (cast.TILE, cast.ROWS) == (cast._kernels.TILE, cast._kernels.ROWS)
    assert cast.pack_right(np.ones((3, 40), np.float32)).shape == (-(-40 // cast.TILE), 3, cast.TILE)
    _, _, block = stream.block_rows((100_000, 64))
    assert block % (2 * cast.ROWS) == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("out_dtype,tdtype", [("BF16", torch.bfloat16), ("F16", torch.float16)])
def test_float32_casts_match_torch(impl, out_dtype, tdtype):
    x = _random()
    got, bad = _run(impl, x, "F32", None, out_dtype)
    want = _torch_bits(x, tdtype)
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], want[~nan])
    back = got.view(np.float16).astype(np.float32) if out_dtype == "F16" else (
        got.astype(np.uint32) << 16).view(np.float32)
    assert np.isnan(back[nan]).all()  # NaN stays NaN
    assert bad == int((~np.isfinite(back)).sum())
    # finite values past the range become inf, as torch's casts do
    big = np.array([3.4028235e38 if out_dtype == "BF16" else 65520.0], np.float32)
    assert _run(impl, big, "F32", None, out_dtype)[1] == 1


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("src_dtype,tsrc", [("BF16", torch.bfloat16), ("F16", torch.float16),
                                            ("F32", torch.float32)])
@pytest.mark.parametrize("out_dtype,tout", [("BF16", torch.bfloat16), ("F16", torch.float16),
                                            ("F32", torch.float32)])
def test_fused_add_matches_torch(impl, src_dtype, tsrc, out_dtype, tout):
    rng = np.random.default_rng(7)
    n = 50_001  # odd: no vector-width assumptions
    w = torch.from_numpy(np.concatenate([rng.standard_normal(n - len(EDGES)).astype(np.float32), EDGES]))
    w = w.to(tsrc)
    delta = (rng.standard_normal(n) * rng.choice([1e-6, 1e-3, 1.0, 1e5], n)).astype(np.float32)
    raw = w.view(torch.int16 if tsrc != torch.float32 else torch.int32).numpy()
    got, bad = _run(impl, raw, src_dtype, delta, out_dtype)
    want_t = (w.to(torch.float32) + torch.from_numpy(delta)).to(tout)
    want = want_t.view(torch.int16 if tout != torch.float32 else torch.int32).numpy()
    want = want.view(np.uint16 if tout != torch.float32 else np.float32)
    nan = torch.isnan(want_t).numpy()
    assert np.array_equal(got.view(want.dtype)[~nan], want[~nan])
    assert bad == int((~torch.isfinite(want_t)).sum())
    plain, _ = _run(impl, raw, src_dtype, None, out_dtype)  # a conversion without delta
    want_plain = w.to(torch.float32).to(tout)
    nan = torch.isnan(want_plain).numpy()
    want_plain = want_plain.view(torch.int16 if tout != torch.float32 else torch.int32).numpy()
    assert np.array_equal(plain.view(want_plain.dtype)[~nan], want_plain[~nan])


def test_c_and_numpy_agree_on_every_bit_nans_included():
    if not cast.have_c_kernel():
        pytest.skip("C kernel not built")
    x = _random(seed=3)
    delta = np.random.default_rng(4).standard_normal(len(x)).astype(np.float32)
    for src_dtype in ("BF16", "F16"):
        raw = _run(cast._numpy_add_cast, x, "F32", None, src_dtype)[0]
        for out_dtype in ("BF16", "F16", "F32"):
            for d in (None, delta):
                a = _run(cast._kernels.add_cast, raw, src_dtype, d, out_dtype)
                b = _run(cast._numpy_add_cast, raw, src_dtype, d, out_dtype)
                assert a[1] == b[1] and a[0].tobytes() == b[0].tobytes(), (src_dtype, out_dtype)
    for out_dtype in ("BF16", "F16", "F32"):
        a = _run(cast._kernels.add_cast, x, "F32", delta, out_dtype)
        b = _run(cast._numpy_add_cast, x, "F32", delta, out_dtype)
        assert a[1] == b[1] and a[0].tobytes() == b[0].tobytes(), out_dtype


def test_in_place_float32_and_bad_arguments():
    x = np.arange(10, dtype=np.float32)
    d = np.ones(10, dtype=np.float32)
    assert cast.add_cast(x, "F32", d, d, "F32") == 0  # out may be delta itself
    assert np.array_equal(d, x + 1)
    with pytest.raises(ValueError):
        cast.add_cast(x, "F64", None, np.empty(10, np.float32), "F32")
    with pytest.raises(ValueError):
        cast.add_cast(x[:3], "F32", None, np.empty(10, np.float32), "F32")


def test_reads_an_mmap_without_copying(tmp_path):
    import mmap

    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    bf = _torch_bits(x, torch.bfloat16)
    p = tmp_path / "w.bin"
    p.write_bytes(bf.tobytes())
    with open(p, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mm:
        src = np.frombuffer(mm, dtype=np.uint16)  # a view of the mapping, no copy
        got, _ = _run(cast.add_cast, src, "BF16", None, "F32")
        del src
    assert np.array_equal(got, (bf.astype(np.uint32) << 16).view(np.float32))


def _lowrank(fn, raw, src_dtype, left, packed, out_dtype):
    rows, rank = left.shape
    n = len(raw.view(np.uint8)) // (4 if src_dtype == "F32" else 2)
    out = np.empty(n * (4 if out_dtype == "F32" else 2), np.uint8)
    return out, fn(raw, src_dtype, left, packed, rank, out, out_dtype)


@pytest.mark.parametrize("rank,rows,cols", [(1, 3, 5), (2, 7, 33), (16, 9, 100), (40, 4, 64), (128, 3, 70)])
def test_lowrank_c_and_numpy_agree_and_are_fma_exact(rank, rows, cols):
    rng = np.random.default_rng(rank * 1000 + cols)
    left = (rng.standard_normal((rows, rank)) * rng.choice([1e-3, 1.0, 30.0], (rows, rank))).astype(np.float32)
    right = (rng.standard_normal((rank, cols)) * 0.01).astype(np.float32)
    w = (rng.standard_normal(rows * cols) * 0.02).astype(np.float32)
    packed = cast.pack_right(right)
    truth = w.astype(np.float64).reshape(rows, cols) + left.astype(np.float64) @ right.astype(np.float64)
    for src_dtype in ("BF16", "F16", "F32"):
        raw = _run(cast._numpy_add_cast, w, "F32", None, src_dtype)[0]
        base = _run(cast._numpy_add_cast, raw, src_dtype, None, "F32")[0].astype(np.float64)
        truth = base.reshape(rows, cols) + left.astype(np.float64) @ right.astype(np.float64)
        for out_dtype in ("BF16", "F16", "F32"):
            ours, bad = _lowrank(cast._numpy_lowrank_add_cast, raw, src_dtype, left, packed, out_dtype)
            if cast.have_c_kernel():
                c, cbad = _lowrank(cast._kernels.lowrank_add_cast, raw, src_dtype, left, packed, out_dtype)
                assert c.tobytes() == ours.tobytes() and cbad == bad, (src_dtype, out_dtype)
            got = _run(cast._numpy_add_cast, ours.view(np.uint16 if out_dtype != "F32" else np.float32),
                       out_dtype, None, "F32")[0].reshape(rows, cols)
            # float32 accumulation: within a few float32 ulps of the float64 truth, before the cast
            step = {"BF16": 2.0**-8, "F16": 2.0**-11, "F32": 2.0**-22}[out_dtype]
            tol = np.abs(truth) * step + np.abs(left.astype(np.float64)) @ np.abs(right) * 2.0**-20 + 1e-30
            assert bool((np.abs(got - truth) <= tol + (6e-8 if out_dtype == "F16" else 0)).all())


def test_numpy_fma_is_correctly_rounded():
    rng = np.random.default_rng(5)
    a = rng.standard_normal(200_000).astype(np.float32)
    b = rng.standard_normal(200_000).astype(np.float32)
    # c chosen so that a·b + c often lands near float32 midpoints
    c = (-(a.astype(np.float64) * b)).astype(np.float32) * np.float32(1 - 2.0**-20)
    got = cast._fma(a, b, c)
    if cast.have_c_kernel():  # the kernel at rank 2: acc = fma(1, c, 0) = c, then fma(a, b, c)
        packed = np.zeros((1, 2, cast.TILE), np.float32)
        for i in range(0, 200_000, 101):
            packed[0, :, 0] = [c[i], b[i]]
            o = np.empty(4, np.uint8)
            cast._kernels.lowrank_add_cast(np.zeros(1, np.float32), "F32", np.array([[1.0, a[i]]], np.float32),
                                           packed, 2, o, "F32")
            assert o.view(np.float32)[0] == got[i] or (np.isnan(got[i]) and np.isnan(o.view(np.float32)[0]))
    # and against exact rational arithmetic on a sample
    from fractions import Fraction

    for i in range(0, 200_000, 997):
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        r = got[i]
        lo, hi = np.nextafter(r, np.float32(-np.inf)), np.nextafter(r, np.float32(np.inf))
        err = abs(Fraction(float(r)) - exact)
        assert err <= abs(Fraction(float(lo)) - exact) and err <= abs(Fraction(float(hi)) - exact)


def test_lowrank_vector_epilogue_on_edge_values():
    """Every output dtype through the kernel's vector epilogue: random bits (NaN, inf,
    subnormals), huge deltas that overflow float16 and bfloat16: C == numpy, bit for bit."""
    if not cast.have_c_kernel():
        pytest.skip("C kernel not built")
    rows, cols, rank = 7, 16 * 9 + 5, 2
    x = _random(n=rows * cols, seed=11)[: rows * cols]
    rng = np.random.default_rng(12)
    left = (rng.standard_normal((rows, rank)) * rng.choice([0.0, 1.0, 1e19], (rows, rank))).astype(np.float32)
    packed = cast.pack_right((rng.standard_normal((rank, cols)) * 1e19).astype(np.float32))
    for src_dtype in ("BF16", "F16", "F32"):
        raw = x if src_dtype == "F32" else _run(cast._numpy_add_cast, x, "F32", None, src_dtype)[0]
        for out_dtype in ("BF16", "F16", "F32"):
            c = _lowrank(cast._kernels.lowrank_add_cast, raw, src_dtype, left, packed, out_dtype)
            n = _lowrank(cast._numpy_lowrank_add_cast, raw, src_dtype, left, packed, out_dtype)
            assert c[0].tobytes() == n[0].tobytes() and c[1] == n[1], (src_dtype, out_dtype)


def test_portable_paths_give_the_vector_paths_bits():
    """CPUs without AVX2/FMA/F16C run the portable C (fmaf, scalar casts): same bits."""
    if not cast.have_c_kernel():
        pytest.skip("C kernel not built")
    K = cast._kernels
    rows, cols, rank = 13, 16 * 5 + 3, 20
    rng = np.random.default_rng(21)
    x = _random(n=rows * cols, seed=22)[: rows * cols]
    left = (rng.standard_normal((rows, rank)) * 0.1).astype(np.float32)
    packed = cast.pack_right((rng.standard_normal((rank, cols)) * 0.1).astype(np.float32))
    delta = rng.standard_normal(rows * cols).astype(np.float32)
    results = {}
    try:
        for vector in (True, False):
            K.use_vector(vector)
            for src_dtype in ("BF16", "F16", "F32"):
                raw = x if src_dtype == "F32" else _run(cast._numpy_add_cast, x, "F32", None, src_dtype)[0]
                for out_dtype in ("BF16", "F16", "F32"):
                    lr = _lowrank(K.lowrank_add_cast, raw, src_dtype, left, packed, out_dtype)
                    ac = _run(K.add_cast, raw, src_dtype, delta, out_dtype)
                    results[vector, src_dtype, out_dtype] = (lr[0].tobytes(), lr[1], ac[0].tobytes(), ac[1])
    finally:
        K.use_vector(True)
    for key, value in results.items():
        if key[0]:
            assert value == results[(False, *key[1:])], key
