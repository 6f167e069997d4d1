"""The merge into a base runs without torch: numpy adapter loading, the fused kernel path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_gpt2, make_llama, make_peft_adapter

from adapterhub_local.errors import InvalidAdapter
from adapterhub_local.merge import resolve_inputs
from adapterhub_local.merge.base import merge_into_base
from adapterhub_local.peft_format import WEIGHTS_NAME, load_adapter


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("nt") / "base", dtype=torch.bfloat16, max_shard_size="40KB")


@pytest.fixture(scope="module")
def adapter(llama, tmp_path_factory):
    return make_peft_adapter(llama, tmp_path_factory.mktemp("nta") / "a",
                             target_modules=["q_proj", "v_proj", "down_proj", "gate_proj"])


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_cli_merge_register_and_replay_never_import_torch(llama, adapter, tmp_path):
    b = make_peft_adapter(llama, tmp_path / "b", seed=5, r=3, target_modules=["q_proj", "up_proj"])
    out, again = tmp_path / "m", tmp_path / "again"
    code = f"""
import sys
from adapterhub_local.cli import main
def run(args):
    try:
        main(args)
    except SystemExit as e:
        assert not e.code, e.code
run(["merge", {str(llama)!r}, {str(adapter)!r}, {str(b)!r}, "--weights", "0.7,-0.3", "--dtype", "float32",
     "--register", "combo", "--out", {str(out)!r}, "--json"])
run(["merge", "--recipe", {str(out / "recipe.yaml")!r}, "--out", {str(again)!r}, "--json"])
heavy = sorted(m for m in ("torch", "transformers", "safetensors", "peft") if m in sys.modules)
assert heavy == [], heavy
"""
    env = {**os.environ, "ADAPTERS_HOME": str(tmp_path / "home"), "ADAPTERS_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _files(out) == _files(again)  # byte-identical replay, recipe.yaml included
    # and it is the same merge the library computes from torch-loaded adapters
    lib = tmp_path / "lib"
    merge_into_base(llama, resolve_inputs([str(adapter), str(b)], [0.7, -0.3]), lib, dtype="float32",
                    progress=False, notify=None)
    for name in (n for n in _files(lib) if n.endswith(".safetensors")):
        assert (lib / name).read_bytes() == (out / name).read_bytes(), name


def test_numpy_inputs_give_the_same_bytes_as_torch_inputs(tmp_path):
    base = make_gpt2(tmp_path / "g")
    ad = make_peft_adapter(base, tmp_path / "ad", target_modules=["c_attn", "wte"], fan_in_fan_out=True)
    outs = {}
    for arrays in ("torch", "numpy"):
        outs[arrays] = tmp_path / arrays
        inputs = resolve_inputs([str(ad)])
        if arrays == "torch":  # the same factors as torch tensors (torch.from_numpy, no copy)
            for inp in inputs:
                inp.adapter = inp.adapter.to_torch()
        merge_into_base(base, inputs, outs[arrays], progress=False, notify=None)
    assert _files(outs["torch"]) == _files(outs["numpy"])


def test_numpy_loader_matches_the_torch_loader_and_its_errors(adapter, tmp_path):
    tl, nl = load_adapter(adapter).to_torch(), load_adapter(adapter)
    assert tl.config == nl.config and set(tl.modules) == set(nl.modules)
    for name, m in tl.modules.items():
        n = nl.modules[name]
        assert isinstance(n.A, np.ndarray) and n.A.dtype == np.float32
        assert np.array_equal(n.A, m.A.float().numpy()) and np.array_equal(n.B, m.B.float().numpy())
        assert (n.scale, n.kind, n.fan_in_fan_out, n.rank) == (m.scale, m.kind, m.fan_in_fan_out, m.rank)
    assert nl.num_parameters() == tl.num_parameters()

    # bfloat16 and float16 factors are upcast exactly
    for dt in (torch.bfloat16, torch.float16):
        low = tmp_path / f"low-{dt}"
        low.mkdir()
        (low / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
        t = {k: v.to(dt) for k, v in load_file(adapter / WEIGHTS_NAME).items()}
        save_file(t, low / WEIGHTS_NAME, metadata={"format": "pt"})
        got = load_adapter(low)
        for name, m in load_adapter(low).to_torch().modules.items():
            assert np.array_equal(got.modules[name].B, m.B.float().numpy())

    def broken(tag, mutate):
        d = tmp_path / tag
        d.mkdir()
        (d / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
        mutate(d)
        return d

    raw = (adapter / WEIGHTS_NAME).read_bytes()
    tensors = load_file(adapter / WEIGHTS_NAME)
    key = next(k for k in tensors if "lora_B" in k)
    cases = {
        "truncated": lambda d: (d / WEIGHTS_NAME).write_bytes(raw[: len(raw) - 100]),
        "garbage": lambda d: (d / WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"),
        "nan": lambda d: save_file({**tensors, key: tensors[key] * float("nan")}, d / WEIGHTS_NAME),
        "rank": lambda d: (save_file(tensors, d / WEIGHTS_NAME), (d / "adapter_config.json").write_text(
            json.dumps({**json.loads((adapter / "adapter_config.json").read_text()), "r": 7}))),
        "missing B": lambda d: save_file({k: v for k, v in tensors.items() if k != key}, d / WEIGHTS_NAME),
    }
    for tag, mutate in cases.items():
        d = broken(tag.replace(" ", "-"), mutate)
        with pytest.raises(InvalidAdapter) as t_err:
            load_adapter(d)
        with pytest.raises(InvalidAdapter) as n_err:
            load_adapter(d)
        if tag in ("truncated", "garbage"):
            assert "not a readable safetensors file" in str(n_err.value), tag
        else:  # the shared validation: the very same message
            assert str(n_err.value) == str(t_err.value), tag


def test_bf16_merge_is_never_further_from_float32_truth_than_peft(llama, adapter, tmp_path):
    """The fused kernel's single cast: at most as far from the float64 truth as PEFT's bf16 merge."""
    from peft import PeftModel
    from tiny import load_model

    out = tmp_path / "m"
    merge_into_base(llama, resolve_inputs([str(adapter)]), out, progress=False, notify=None)
    ours = {}
    for f in sorted(out.glob("model-*.safetensors")):
        ours.update(load_file(f))
    base = {}
    for f in sorted(llama.glob("model-*.safetensors")):
        base.update(load_file(f))
    peft = PeftModel.from_pretrained(load_model(llama, torch.bfloat16), str(adapter)).merge_and_unload()
    ref = {k: v.detach() for k, v in peft.state_dict().items()}
    ad = load_adapter(adapter).to_torch()
    checked = 0
    for name, m in ad.modules.items():
        key = f"{name}.weight"
        truth = base[key].double() + m.scale * (m.B.double() @ m.A.double())
        e_ours = (ours[key].double() - truth).abs()
        e_peft = (ref[key].double() - truth).abs()
        assert bool((e_ours <= e_peft).all()), key
        # and exactly the float64 truth rounded once to bfloat16 but for float32 near-ties
        assert int((ours[key] != truth.float().to(torch.bfloat16)).sum()) <= max(1, truth.numel() // 1000)
        checked += 1
    assert checked == len(ad.modules) > 0


@pytest.mark.parametrize("cores", [2, 5])
def test_high_rank_blocks_on_every_core_give_the_same_bytes(llama, tmp_path, monkeypatch, cores):
    """Stacked adapters above LOWRANK_SPLIT run blocks on a pool of compute threads; the fma
    chain makes every value independent of threads and block sizes: identical bytes."""
    import adapterhub_local.merge.stream as st

    ads = [make_peft_adapter(llama, tmp_path / f"a{i}", seed=20 + i, r=24,
                             target_modules=["q_proj", "down_proj", "gate_proj"]) for i in range(3)]
    inputs = resolve_inputs([str(a) for a in ads], [0.5, 1.0, -0.25])
    assert sum(inp.adapter.ranks[0] for inp in inputs) > st.LOWRANK_SPLIT
    monkeypatch.setattr(st, "BLOCK_ELEMS", 64)  # many blocks per tensor, several in flight
    monkeypatch.setattr(st, "cores", lambda: cores)  # more compute threads than output slots
    pooled = tmp_path / "pooled"
    merge_into_base(llama, inputs, pooled, progress=False, notify=None)
    monkeypatch.setattr(st, "LOWRANK_SPLIT", 10_000)
    monkeypatch.setattr(st, "BLOCK_ELEMS", 1024 * 1024)
    single = tmp_path / "single"
    merge_into_base(llama, inputs, single, progress=False, notify=None)
    assert _files(pooled) == _files(single)


def test_pooled_blocks_run_on_across_tensors_and_copies_keep_their_place(llama, tmp_path, monkeypatch):
    """The compute threads' queue is not drained at each tensor's end: the next tensor's blocks
    (and the copies of untouched tensors between them) queue behind the ones in flight, and
    everything still reaches the file in order: the same bytes as the one-thread merge."""
    import adapterhub_local.merge.base as mbase
    import adapterhub_local.merge.stream as st

    ads = [make_peft_adapter(llama, tmp_path / f"a{i}", seed=40 + i, r=40,
                             target_modules=["q_proj", "v_proj", "up_proj"]) for i in range(2)]
    inputs = resolve_inputs([str(a) for a in ads], [1.0, -0.5])
    seen = []
    real = mbase.compute_tensor

    def spy(t, e, reader, hasher, fh, pipe, *a, **k):
        seen.append((pipe.in_flight, len(pipe.queue)))
        return real(t, e, reader, hasher, fh, pipe, *a, **k)

    monkeypatch.setattr(mbase, "compute_tensor", spy)
    monkeypatch.setattr(st, "BLOCK_ELEMS", 96)
    monkeypatch.setattr(st, "cores", lambda: 3)
    pooled = tmp_path / "pooled"
    merge_into_base(llama, inputs, pooled, progress=False, notify=None)
    assert max(n for n, _ in seen) > 0  # a tensor started while the previous one's blocks ran
    monkeypatch.setattr(mbase, "compute_tensor", real)
    monkeypatch.setattr(st, "LOWRANK_SPLIT", 10_000)
    single = tmp_path / "single"
    merge_into_base(llama, inputs, single, progress=False, notify=None)
    assert _files(pooled) == _files(single)


def test_pooled_float16_overflow_is_refused_and_leaves_nothing(llama, tmp_path, monkeypatch):
    import adapterhub_local.merge.stream as st
    from adapterhub_local.errors import AdapterHubError

    ads = [make_peft_adapter(llama, tmp_path / f"a{i}", seed=50 + i, r=40, target_modules=["q_proj", "o_proj"])
           for i in range(2)]
    inputs = resolve_inputs([str(a) for a in ads], [1e9, 1e9])
    monkeypatch.setattr(st, "BLOCK_ELEMS", 96)
    with pytest.raises(AdapterHubError, match="overflows float16"):
        merge_into_base(llama, inputs, tmp_path / "o", dtype="float16", progress=False, notify=None)
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]


def test_untouched_tensors_copied_in_place_by_the_kernel_or_by_pread_pwrite(llama, adapter, tmp_path, monkeypatch):
    """With the fingerprint cached, untouched tensors are copied straight to their offsets
    (copy_file_range, on the copy thread) while the ordered writes step over them; where the
    kernel refuses (another filesystem), plain pread/pwrite. Same bytes as the hashing pass."""
    import errno

    import adapterhub_local.merge.stream as st

    inputs = resolve_inputs([str(adapter)])
    cold = tmp_path / "cold"
    assert merge_into_base(llama, inputs, cold, progress=False, notify=None).fingerprint["source"] != "cache"
    calls = []
    real = os.copy_file_range

    def spy(*a):
        calls.append(a)
        return real(*a)

    monkeypatch.setattr(st.os, "copy_file_range", spy)
    kernel = tmp_path / "kernel"
    assert merge_into_base(llama, inputs, kernel, progress=False, notify=None).fingerprint["source"] == "cache"
    assert calls and all(len(c) == 5 for c in calls)  # explicit source and destination offsets

    def refuse(*a):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(st.os, "copy_file_range", refuse)
    plain = tmp_path / "plain"
    merge_into_base(llama, inputs, plain, progress=False, notify=None)
    assert _files(cold) == _files(kernel) == _files(plain)


def test_without_the_c_kernel_the_numpy_fallback_writes_the_same_bytes(llama, adapter, tmp_path, monkeypatch):
    """Where the optional extension did not build, the merge still works, bit for bit."""
    from adapterhub_local.merge import cast

    b = make_peft_adapter(llama, tmp_path / "b", seed=8, r=2, target_modules=["q_proj", "o_proj"])
    inputs = resolve_inputs([str(adapter), str(b)], [1.0, 0.5])
    outs = {}
    for kind in ("c", "numpy"):
        if kind == "numpy":
            monkeypatch.setattr(cast, "_kernels", None)
        for dtype in ("auto", "float16"):
            outs[kind, dtype] = tmp_path / f"{kind}-{dtype}"
            merge_into_base(llama, inputs, outs[kind, dtype], dtype=dtype, progress=False, notify=None)
    for dtype in ("auto", "float16"):
        assert _files(outs["c", dtype]) == _files(outs["numpy", dtype])


@pytest.mark.parametrize("transposed", [False, True])
def test_prepared_operands_equal_stacked_then_packed_factors(transposed):
    """The one-pass operand builder equals the plain stack (_factors) + pack_right."""
    from adapterhub_local.lora import LoraModule
    from adapterhub_local.merge.cast import pack_right
    from adapterhub_local.merge.plan import Edit
    from adapterhub_local.merge.stream import _factors, prepare

    rng = np.random.default_rng(3)
    mods = [(LoraModule("m", rng.standard_normal((r, 37)).astype(np.float32),
                        rng.standard_normal((21, r)).astype(np.float32), scale=0.5 * r,
                        kind="embedding" if transposed else "linear"), w)
            for r, w in ((3, 0.7), (5, -1.5), (2, 2.0))]
    (left, _, rank), packed = (lambda p: (p[0][0], p[1]))(prepare(Edit(deltas=mods)))
    lf, rt, r2 = _factors(mods, transposed)
    assert rank == r2 == 10 and np.array_equal(left, lf) and np.array_equal(packed, pack_right(rt))


def test_adapter_file_hashes_computed_in_the_background_are_the_files_sha256(adapter):
    """A merge into a base hashes its adapters' files (for the recipe) while it merges."""
    import hashlib

    (inp,) = resolve_inputs([str(adapter)])
    want = {name: hashlib.sha256((adapter / name).read_bytes()).hexdigest()
            for name in ("adapter_config.json", WEIGHTS_NAME)}
    assert inp.files == want and inp.to_recipe()["sha256"] == want


def test_an_adapter_file_unreadable_in_its_background_hash_is_one_clear_error(adapter, monkeypatch):
    import errno

    from adapterhub_local.errors import AdapterHubError
    from adapterhub_local.merge import inputs as mi

    def broken(path):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(mi, "file_sha256", broken)
    (inp,) = resolve_inputs([str(adapter)])
    with pytest.raises(AdapterHubError, match=r"adapter_config.json: cannot read \(Input/output error\)"):
        inp.files  # noqa: B018
