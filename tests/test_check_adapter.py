"""The numpy-free adapter check (peft_format.check_adapter, safetensors_io.read_views) that
register and push use: it finds exactly the infs and NaNs torch finds, in every float dtype,
with the C scan and its numpy fallback alike, and refuses every bad adapter with the very line
the array reader (load_adapter, what inspect and merge use) gives."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli_core import BAD_CASES, _a_key, _copy, _edit_tensors, assert_one_line_error, run_main
from tiny import make_peft_adapter

from adapterhub_local import safetensors_io
from adapterhub_local.errors import InvalidAdapter
from adapterhub_local.peft_format import adapter_summary, check_adapter, load_adapter
from adapterhub_local.safetensors_io import DTYPES

TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
         "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
UINT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _patterns(dtype: str) -> torch.Tensor:
    """Every bit pattern of a 1- or 2-byte float; 300k random ones and the edges for wider ones."""
    size = DTYPES[dtype].itemsize
    if size <= 2:
        bits = torch.arange(0, 2 ** (8 * size), dtype=torch.int64)
        return bits.to(torch.uint8 if size == 1 else torch.int32).to(UINT[size]).view(TORCH[dtype])
    g = torch.Generator().manual_seed(size)
    raw = torch.randint(-(2**62), 2**62, (300_000,), generator=g, dtype=torch.int64)
    vals = raw.to(torch.int32).view(torch.float32) if size == 4 else raw.view(torch.float64)
    edges = torch.tensor([0.0, -0.0, 1.0, float("inf"), float("-inf"), float("nan"), 3.0e38, -1e-40],
                         dtype=TORCH[dtype])
    return torch.cat([vals.to(TORCH[dtype]) if size == 4 else vals, edges])


def _raw(t: torch.Tensor) -> bytes:
    return t.view(UINT[t.element_size()]).numpy().tobytes()


@pytest.mark.parametrize("kernel", [True, False], ids=["c", "numpy"])
@pytest.mark.parametrize("dtype", sorted(TORCH))
def test_the_scan_finds_what_torch_finds(dtype, kernel, monkeypatch):
    if not kernel:
        monkeypatch.setattr(safetensors_io, "_kernels_scan", lambda: None)
    elif safetensors_io._kernels_scan() is None:
        pytest.skip("the C kernel was not built")
    t = _patterns(dtype)
    special = ~torch.isfinite(t.float() if t.dtype.itemsize == 1 else t)
    dt = DTYPES[dtype]
    # every element alone: which ones count
    raw = _raw(t)
    hits = [safetensors_io._first_special(raw[i * dt.itemsize:(i + 1) * dt.itemsize], dt) == 0
            for i in range(min(len(t), 70_000))]
    assert hits == special[: len(hits)].tolist()
    # the first one in a long run, wherever it sits (block edges of the C scan included)
    finite = t[~special]
    finite = finite.repeat(20_000 // len(finite) + 1)  # long enough for several blocks of the scan
    for pos in (0, 1, 4095, 4096, 4097, 12_345, len(finite) - 1):
        buf = finite.clone()
        if special.any():
            buf[pos] = t[special][pos % int(special.sum())]
            assert safetensors_io._first_special(_raw(buf), dt) == pos
        assert safetensors_io._first_special(_raw(finite), dt) == -1


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory, llama_dir):
    return make_peft_adapter(llama_dir, tmp_path_factory.mktemp("good") / "ad", r=4, lora_alpha=8)


def _message(fn, folder) -> str | None:
    try:
        fn(folder)
    except InvalidAdapter as e:
        return str(e)
    return None


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16", "F64"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_check_and_load_refuse_the_same_non_finite_tensor(dtype, value, good_adapter, tmp_path):
    folder = _copy(good_adapter, tmp_path / "ad")
    tensors = {k: v.to(TORCH[dtype]) for k, v in load_file(folder / "adapter_model.safetensors").items()}
    key = sorted(k for k in tensors if "lora_B" in k)[-1]
    tensors[key].view(-1)[-1] = value
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    want = _message(load_adapter, folder)
    assert want is not None and key in want and "non-finite" in want
    assert _message(check_adapter, folder) == want


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_a_clean_adapter_reads_the_same_both_ways(dtype, good_adapter, tmp_path):
    folder = _copy(good_adapter, tmp_path / "ad")
    tensors = {k: v.to(TORCH[dtype]) for k, v in load_file(folder / "adapter_model.safetensors").items()}
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    full, head = adapter_summary(load_adapter(folder), norms=False), adapter_summary(check_adapter(folder), norms=False)
    assert json.dumps(full, sort_keys=True) == json.dumps(head, sort_keys=True)
    assert head["trainable_parameters"] == sum(t.numel() for t in tensors.values()) > 0
    assert all(m["delta_norm"] is None for m in head["modules"])


def test_float8_is_refused_by_both_readers_alike(good_adapter, tmp_path):
    folder = _copy(good_adapter, tmp_path / "ad")
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors[_a_key(tensors)] = tensors[_a_key(tensors)].to(torch.float8_e4m3fn)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    want = _message(load_adapter, folder)
    assert want is not None and "F8_E4M3" in want and "no numpy form" in want
    assert _message(check_adapter, folder) == want


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_register_and_push_refuse_what_inspect_refuses(case, good_adapter, tmp_path, capsys):
    """register and push --dry-run check adapters header-first (no numpy); each bad input of
    test_cli_core still gets inspect's exact line, and nothing is registered or staged."""
    folder = _copy(good_adapter, tmp_path / "bad")
    spoil, needles = BAD_CASES[case]
    spoil(folder)
    _, _, want = run_main(["inspect", str(folder)], capsys)
    home = tmp_path / "home"
    code, out, err = run_main(["--registry", str(home), "register", str(folder), "--name", "x"], capsys)
    assert_one_line_error(code, err, *needles)
    assert err == want and out == ""
    code, out, err = run_main(["--registry", str(home), "push", str(folder), "me/x", "--dry-run",
                               "--dry-run-dir", str(tmp_path / "staged")], capsys)
    if case == "not_a_dir":  # push names the missing ref its own way
        assert_one_line_error(code, err, "no such file or directory")
    else:
        assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "staged").exists()
    shutil.rmtree(home, ignore_errors=True)


def test_register_reads_no_values_it_does_not_check(good_adapter, tmp_path, capsys):
    # a NaN planted in the last element of the last tensor (the scan's tail) is still found
    folder = _copy(good_adapter, tmp_path / "ad")
    _edit_tensors(folder, lambda t: t[sorted(t)[-1]].view(-1).__setitem__(-1, float("nan")))
    code, _, err = run_main(["--registry", str(tmp_path / "h"), "register", str(folder), "--name", "x"], capsys)
    assert_one_line_error(code, err, "non-finite", sorted(load_file(folder / "adapter_model.safetensors"))[-1])
