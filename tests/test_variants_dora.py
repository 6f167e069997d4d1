"""DoRA merged into a base, against PEFT's own merge_and_unload (adapters made by PEFT)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import input_ids, load_model, make_gpt2, make_llama

from adapterhub_local.cli import main


def make_dora(base: Path, out: Path, seed: int = 1, **kw) -> Path:
    """A DoRA adapter PEFT creates itself: random non-zero A and B, and the magnitude PEFT
    initialised (‖W + s·B·A‖ at init) perturbed by ±20 %, so m/‖W+ΔW‖ is not 1."""
    from peft import LoraConfig, get_peft_model

    model = load_model(base)
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    kw.setdefault("target_modules", ["q_proj", "v_proj"])
    peft_model = get_peft_model(model, LoraConfig(use_dora=True, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(out)
    return Path(out)


def peft_merge(base: Path, adapters: list[Path], dtype=torch.float32):
    """PEFT's merge_and_unload of ``adapters`` in the given order, and its logits."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base, dtype), str(adapters[0]), adapter_name="a0")
    for i, ad in enumerate(adapters[1:], 1):
        model.load_adapter(str(ad), adapter_name=f"a{i}")
    merged = model.merge_and_unload(adapter_names=[f"a{i}" for i in range(len(adapters))]).eval()
    with torch.no_grad():
        lg = merged(input_ids()).logits
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}, lg


def run(args: list[str]) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


def ours(base: Path, adapters: list[Path], out: Path, *extra: str):
    from adapterhub_local.fingerprint import model_files

    assert run(["merge", base, *adapters, "--out", out, *extra]) == 0
    state = {}
    for f in model_files(out):
        state.update(load_file(f))
    with torch.no_grad():
        lg = load_model(out)(input_ids()).logits
    return state, lg


def assert_rel(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5):
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err <= tol, err


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("dllama") / "base")


@pytest.mark.parametrize("kw", [
    {},
    {"use_rslora": True, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 3}},
    {"target_modules": ["q_proj", "embed_tokens"]},
], ids=["plain", "rslora", "rank_pattern", "embedding"])
def test_dora_merge_equals_peft(llama, tmp_path, kw):
    ad = make_dora(llama, tmp_path / "d", **kw)
    want, want_logits = peft_merge(llama, [ad])
    got, got_logits = ours(llama, [ad], tmp_path / "m")
    changed = 0
    for k, w in want.items():
        if k == "lm_head.weight" and k not in got:
            continue
        assert_rel(got[k], w)
        changed += not torch.equal(got[k], load_model(llama).state_dict()[k]) if "proj" in k or "embed" in k else 0
    assert changed >= 2
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_dora_equals_peft(tmp_path):
    base = make_gpt2(tmp_path / "g")
    ad = make_dora(base, tmp_path / "d", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    want, want_logits = peft_merge(base, [ad])
    got, got_logits = ours(base, [ad], tmp_path / "m")
    for k in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"):
        assert_rel(got[k], want[k])
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)


def test_several_adapters_in_command_line_order_equal_peft(llama, tmp_path):
    d1 = make_dora(llama, tmp_path / "d1", seed=1)
    d2 = make_dora(llama, tmp_path / "d2", seed=2, target_modules=["q_proj"])
    from tiny import make_peft_adapter

    p = make_peft_adapter(llama, tmp_path / "p", seed=3, target_modules=["q_proj", "v_proj"])
    key = "model.layers.0.self_attn.q_proj.weight"
    results = {}
    for order in ([p, d1, d2], [d2, p, d1]):
        want, want_logits = peft_merge(llama, order)
        got, got_logits = ours(llama, order, tmp_path / f"m{len(results)}")
        for k in want:
            if k in got:
                assert_rel(got[k], want[k])
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
        results[len(results)] = got[key]
    assert not torch.allclose(results[0], results[1], rtol=1e-4, atol=1e-6)  # the order matters, as in PEFT


def test_bf16_dora_merge_no_worse_than_peft_bf16(tmp_path):
    base = make_llama(tmp_path / "b16", dtype=torch.bfloat16)
    ad = make_dora(base, tmp_path / "d")
    truth, _ = peft_merge(base, [ad], torch.float32)
    peft16, _ = peft_merge(base, [ad], torch.bfloat16)
    got, _ = ours(base, [ad], tmp_path / "m")
    for k in truth:
        if "q_proj" in k or "v_proj" in k:
            assert got[k].dtype == torch.bfloat16
            ours_err = (got[k].float() - truth[k]).norm()
            peft_err = (peft16[k].float() - truth[k]).norm()
            assert ours_err <= peft_err, (k, ours_err, peft_err)


def test_dora_weight_other_than_one_is_refused(llama, tmp_path, capsys):
    ad = make_dora(llama, tmp_path / "d")
    capsys.readouterr()
    assert run(["merge", llama, ad, "--weights", "0.5", "--out", tmp_path / "o"]) == 1
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "DoRA adapter with weight 0.5" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args", [
    ["merge", "{a}", "{a}", "--into-adapter", "--out", "{o}"],
    ["stack", "{a}", "{a}", "--out", "{o}"],
    ["interpolate", "{a}", "{a}", "--t", "0.5", "--out", "{o}"],
], ids=["into-adapter", "stack", "interpolate"])
def test_dora_algebra_is_refused_with_why_and_what_to_do(llama, tmp_path, capsys, args):
    ad = make_dora(llama, tmp_path / "d")
    capsys.readouterr()
    assert run([x.format(a=ad, o=tmp_path / "o") for x in args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "DoRA adapter" in err[0] and "not low-rank-additive" in err[0] and "merge it into the base" in err[0]
    assert not (tmp_path / "o").exists()


def test_inspect_shows_dora_modules_and_magnitude_stats(llama, tmp_path, capsys):
    import json

    ad = make_dora(llama, tmp_path / "d")
    capsys.readouterr()
    assert run(["inspect", ad, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["use_dora"] is True and s["dora_modules"] == 4
    mag = load_file(ad / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
    row = next(m for m in s["modules"] if m["module"] == "model.layers.0.self_attn.q_proj")
    assert row["dora"]["magnitude_min"] == pytest.approx(mag.min().item())
    assert row["dora"]["magnitude_max"] == pytest.approx(mag.max().item())
    assert row["dora"]["magnitude_mean"] == pytest.approx(mag.mean().item(), rel=1e-6)
    assert run(["inspect", ad]) == 0
    out = capsys.readouterr().out
    assert "DoRA" in out


@pytest.mark.parametrize("out_kind", ["BF16", "F16", "F32"])
def test_dora_rows_kernel_gives_the_numpy_fallbacks_bits(out_kind):
    import numpy as np

    from adapterhub_local.merge import cast

    if cast._kernels is None:
        pytest.skip("C kernel not built")
    rng = np.random.default_rng(0)
    for rows, cols in ((7, 37), (12, 2048), (3, 8), (5, 1)):
        t = (rng.standard_normal((rows, cols)) * rng.choice([1e-3, 1.0, 3e4], (rows, 1))).astype(np.float32)
        t[0, :] = 0  # a zero row: 0/0
        mag = rng.standard_normal(rows).astype(np.float32) * 50
        item = 4 if out_kind == "F32" else 2
        want = bytearray(rows * cols * item)
        bad_np = cast._numpy_dora_rows_cast(t.reshape(-1), rows, mag, want, out_kind)
        for vector in (True, False):  # the AVX2 path and the portable C path
            was = cast._kernels.use_vector(vector)
            try:
                got = bytearray(rows * cols * item)
                bad_c = cast._kernels.dora_rows_cast(t.reshape(-1), rows, mag, got, out_kind)
            finally:
                cast._kernels.use_vector(was)
            assert bytes(got) == bytes(want) and bad_c == bad_np >= cols
        # and the norm is the float64 norm, rounded
        norms = cast.row_norms(t)
        np.testing.assert_allclose(norms, np.linalg.norm(t.astype(np.float64), axis=1), rtol=1e-7)
