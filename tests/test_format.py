"""PEFT <-> us: what PEFT writes we read, what we write PEFT loads, with equal numbers."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import input_ids, load_model, make_peft_adapter

from adapterhub_local.lora import LoraModule, module_rank_alpha, pattern_key, scaling
from adapterhub_local.peft_format import (
    PREFIX,
    LoraAdapter,
    adapter_summary,
    load_adapter,
    lora_config,
    save_adapter,
)

LLAMA_CASES = {
    "linear": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "rslora_patterns": dict(
        r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 3}, alpha_pattern={"down_proj": 5},
    ),
    "embedding": dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"]),
    "modules_to_save": dict(r=2, lora_alpha=4, target_modules=["v_proj"], modules_to_save=["lm_head"]),
    "all_linear": dict(r=2, lora_alpha=3, target_modules="all-linear"),
}
GPT2_CASES = {
    "conv1d": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]),
    "conv1d_bias": dict(r=2, lora_alpha=2, target_modules=["c_attn"], lora_bias=True),
}


def _peft_deltas(base, adapter_dir):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base), adapter_dir)
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "get_delta_weight") and (
            "default" in getattr(mod, "lora_A", {}) or "default" in getattr(mod, "lora_embedding_A", {})
        ):
            key = name[len(PREFIX):]
            bias = None
            if "default" in getattr(mod, "lora_B", {}) and mod.lora_B["default"].bias is not None:
                bias = mod.lora_B["default"].bias.detach() * mod.scaling["default"]
            out[key] = (mod.get_delta_weight("default").detach(), bias)
    return model, out


@pytest.mark.parametrize("case", list(LLAMA_CASES) + list(GPT2_CASES))
def test_peft_written_adapter_reads_with_equal_deltas(case, llama_dir, gpt2_dir, tmp_path):
    base, kw = (llama_dir, LLAMA_CASES[case]) if case in LLAMA_CASES else (gpt2_dir, GPT2_CASES[case])
    adir = make_peft_adapter(base, tmp_path / "ad", **kw)
    ours = load_adapter(adir)
    _, ref = _peft_deltas(base, adir)
    assert set(ours.modules) == set(ref), "same set of adapted modules"
    for name, (delta, bias) in ref.items():
        mine = ours.modules[name].delta()
        assert mine.shape == delta.shape, name
        torch.testing.assert_close(mine, delta.float(), rtol=1e-5, atol=1e-6)
        if bias is not None:
            torch.testing.assert_close(ours.modules[name].bias_delta(), bias)
    if case == "modules_to_save":
        assert "lm_head.weight" in ours.extra
    if case == "rslora_patterns":
        v = ours.modules["model.layers.0.self_attn.v_proj"]
        assert v.rank == 2 and v.scale == pytest.approx(16 / 2 ** 0.5)
        q1 = ours.modules["model.layers.1.self_attn.q_proj"]
        assert q1.rank == 3
        d = ours.modules["model.layers.0.mlp.down_proj"]
        assert d.scale == pytest.approx(5 / 8 ** 0.5)


def _random_adapter(model, cfg: dict, seed: int = 3) -> LoraAdapter:
    """An adapter built by us (not PEFT) for every targeted module of ``model``."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, mod in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if short not in cfg["target_modules"]:
            continue
        r, alpha = module_rank_alpha(cfg, name)
        w = mod.weight
        if isinstance(mod, torch.nn.Embedding):
            a = torch.randn(r, w.shape[0], generator=g)
            b = torch.randn(w.shape[1], r, generator=g) * 0.1
            kind, fifo = "embedding", False
        elif type(mod).__name__ == "Conv1D":
            a = torch.randn(r, w.shape[0], generator=g) * 0.1
            b = torch.randn(w.shape[1], r, generator=g) * 0.1
            kind, fifo = "linear", True
        else:
            a = torch.randn(r, w.shape[1], generator=g) * 0.1
            b = torch.randn(w.shape[0], r, generator=g) * 0.1
            kind, fifo = "linear", False
        modules[name] = LoraModule(name, a, b, scaling(r, alpha, cfg.get("use_rslora", False)),
                                   kind=kind, fan_in_fan_out=fifo, r=r, alpha=alpha)
    return LoraAdapter(config=cfg, modules=modules)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_our_adapter_loads_in_peft_with_equal_logits(arch, llama_dir, gpt2_dir, tmp_path):
    from peft import PeftModel

    base = llama_dir if arch == "llama" else gpt2_dir
    if arch == "llama":
        cfg = lora_config(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "embed_tokens"],
                          rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})
    else:
        cfg = lora_config(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    model = load_model(base)
    adapter = _random_adapter(model, cfg)
    save_adapter(adapter, tmp_path / "ours")
    ids = input_ids()
    with torch.no_grad():
        sd = model.state_dict()
        for m in adapter.modules.values():
            sd[m.weight_key] += m.delta()
        model.load_state_dict(sd)
        expected = model(ids).logits
        peft_model = PeftModel.from_pretrained(load_model(base), tmp_path / "ours").eval()
        got = peft_model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # and the folder reads back identically
    again = load_adapter(tmp_path / "ours")
    for name, m in adapter.modules.items():
        torch.testing.assert_close(again.modules[name].delta(), m.delta())


def test_roundtrip_peft_folder_through_our_writer(llama_dir, tmp_path):
    from peft import PeftModel

    adir = make_peft_adapter(llama_dir, tmp_path / "peft", r=2, lora_alpha=4,
                             target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])
    ours = load_adapter(adir)
    save_adapter(ours, tmp_path / "copy")
    ids = input_ids()
    with torch.no_grad():
        a = PeftModel.from_pretrained(load_model(llama_dir), adir).eval()(ids).logits
        b = PeftModel.from_pretrained(load_model(llama_dir), tmp_path / "copy").eval()(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    cfg = json.loads((tmp_path / "copy" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["lm_head"]


def test_pattern_key_matches_peft_semantics():
    from peft.utils.other import get_pattern_key

    keys = ["v_proj", r"layers\.1\.self_attn\.q_proj", "mlp"]
    for module in ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj",
                   "model.layers.0.self_attn.q_proj", "model.layers.0.mlp", "xv_proj"]:
        ref = get_pattern_key(keys, module)
        ours = pattern_key(keys, module)
        assert (ours if ours is not None else module) == ref, module


def test_stacked_delta_equals_sum_of_deltas():
    from adapterhub_local.lora import stacked_delta

    g = torch.Generator().manual_seed(0)
    mods = [LoraModule("m", torch.randn(r, 12, generator=g), torch.randn(10, r, generator=g), s)
            for r, s in [(2, 0.5), (5, 2.0), (1, -1.0)]]
    weights = [0.3, 1.0, 0.7]
    expected = sum(w * m.scale * (m.B.double() @ m.A.double()) for m, w in zip(mods, weights))
    got = stacked_delta(list(zip(mods, weights)))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_delta_norm_and_summary(llama_dir, tmp_path):
    adir = make_peft_adapter(llama_dir, tmp_path / "ad", **LLAMA_CASES["rslora_patterns"])
    ad = load_adapter(adir).to_torch()
    summary = adapter_summary(ad)
    assert summary["ranks"] == [2, 3, 8]
    assert summary["use_rslora"] is True
    assert summary["targets"] == ["down_proj", "q_proj", "v_proj"]
    assert summary["trainable_parameters"] == sum(
        m.A.numel() + m.B.numel() for m in ad.modules.values())
    for row in summary["modules"]:
        exact = torch.linalg.norm(ad.modules[row["module"]].delta().double()).item()
        assert row["delta_norm"] == pytest.approx(exact, rel=1e-6)


def test_bf16_adapter_delta_is_computed_in_float32(llama_dir, tmp_path):
    adir = make_peft_adapter(llama_dir, tmp_path / "ad", r=4, lora_alpha=8)
    ad = load_adapter(adir).to_torch()
    m = next(iter(ad.modules.values()))
    exact = m.delta()
    m16 = LoraModule(m.name, m.A.bfloat16(), m.B.bfloat16(), m.scale)
    d = m16.delta()
    assert d.dtype == torch.float32
    ref = (m.B.bfloat16().double() @ m.A.bfloat16().double()) * m.scale
    torch.testing.assert_close(d.double(), ref, rtol=1e-6, atol=1e-7)
    assert exact.dtype == torch.float32
