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
    assert cast.have_c_kernel()


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
