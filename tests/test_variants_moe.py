"""LoRA on MoE expert parameters (target_parameters), against PEFT on tiny transformers MoE models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clitools import exit_code as run
from safetensors.torch import load_file
from tiny import input_ids, load_model


def make_moe(out: Path, kind: str) -> Path:
    torch.manual_seed(0)
    if kind == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                             num_experts_per_tok=2, head_dim=8, max_position_embeddings=64)
        model = Qwen3MoeForCausalLM(cfg)
    elif kind.startswith("gpt_oss"):  # fused experts on disk, stored (E, in, out) (is_transposed)
        from transformers import GptOssConfig, GptOssForCausalLM

        inter = 32 if kind == "gpt_oss_square" else 24  # square: down_proj (E, 32, 32)
        cfg = GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=inter, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           head_dim=8, max_position_embeddings=64, layer_types=["full_attention"] * 2,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        model = GptOssForCausalLM(cfg)
    else:
        from transformers import MixtralConfig, MixtralForCausalLM

        cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                            num_experts_per_tok=2, max_position_embeddings=64)
        model = MixtralForCausalLM(cfg)
    model.save_pretrained(out)
    return out


def experts_path(kind: str) -> str:
    return "mlp.experts" if kind == "qwen3_moe" else "mlp.experts"


def make_expert_adapter(base: Path, out: Path, seed: int = 1, **kw) -> Path:
    from peft import LoraConfig, get_peft_model

    model = load_model(base)
    kw.setdefault("r", 2)
    kw.setdefault("lora_alpha", 4)
    kw.setdefault("target_modules", ["q_proj"])
    peft_model = get_peft_model(model, LoraConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    peft_model.save_pretrained(out)
    return out


def peft_merged(base: Path, adapters: list[Path]):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base), str(adapters[0]), adapter_name="a0")
    for i, ad in enumerate(adapters[1:], 1):
        model.load_adapter(str(ad), adapter_name=f"a{i}")
    with torch.no_grad():
        if len(adapters) == 1:
            want_peft = model(input_ids()).logits
        else:
            want_peft = None
    merged = model.merge_and_unload(adapter_names=[f"a{i}" for i in range(len(adapters))]).eval()
    with torch.no_grad():
        lg = merged(input_ids()).logits
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}, lg, want_peft


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def moe(request, tmp_path_factory):
    return request.param, make_moe(tmp_path_factory.mktemp("moe") / request.param, request.param)


TP = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def test_base_is_saved_per_expert_and_nested_keys_are_two_parameters(moe, tmp_path):
    kind, base = moe
    names = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"] \
        if (base / "model.safetensors.index.json").exists() else load_file(base / "model.safetensors")
    assert not any(k.endswith("experts.gate_up_proj") for k in names)  # per-expert layout on disk
    ad = make_expert_adapter(base, tmp_path / "a", target_parameters=TP)
    keys = load_file(ad / "adapter_model.safetensors")
    assert any(".experts.base_layer.lora_A" in k for k in keys) and any(".experts.lora_A" in k for k in keys)


@pytest.mark.parametrize("kw", [
    {"target_parameters": TP},
    {"target_parameters": TP, "rank_pattern": {"mlp.experts.down_proj": 3}, "alpha_pattern": {"q_proj": 2}},
    {"target_parameters": ["mlp.experts.down_proj"], "use_rslora": True, "target_modules": ["q_proj", "o_proj"]},
], ids=["both", "rank_pattern", "one_param_rslora"])
def test_expert_lora_merge_equals_peft(moe, tmp_path, kw):
    kind, base = moe
    ad = make_expert_adapter(base, tmp_path / "a", **kw)
    want, want_logits, peft_logits = peft_merged(base, [ad])
    assert run(["merge", base, ad, "--out", tmp_path / "m"]) == 0
    model = load_model(tmp_path / "m")
    got = model.state_dict()
    for k, w in want.items():
        err = (got[k].float() - w.float()).norm() / w.float().norm()
        assert err <= 1e-5, (k, err)
    changed = [k for k in want if "experts" in k and not torch.equal(want[k], load_model(base).state_dict()[k])]
    assert changed
    with torch.no_grad():
        lg = model(input_ids()).logits
    torch.testing.assert_close(lg, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lg, peft_logits, rtol=1e-4, atol=1e-5)


def test_two_expert_adapters_merge_like_peft(moe, tmp_path):
    kind, base = moe
    a = make_expert_adapter(base, tmp_path / "a", seed=1, target_parameters=TP)
    b = make_expert_adapter(base, tmp_path / "b", seed=2, target_parameters=TP, r=3)  # PEFT: same parameters
    want, want_logits, _ = peft_merged(base, [a, b])
    assert run(["merge", base, a, b, "--out", tmp_path / "m"]) == 0
    with torch.no_grad():
        lg = load_model(tmp_path / "m")(input_ids()).logits
    torch.testing.assert_close(lg, want_logits, rtol=1e-5, atol=1e-5)


def test_inspect_lists_expert_lora_and_algebra_is_refused(moe, tmp_path, capsys):
    kind, base = moe
    ad = make_expert_adapter(base, tmp_path / "a", target_parameters=TP)
    capsys.readouterr()
    assert run(["inspect", ad, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["target_parameters"] == sorted(TP) or sorted(s["target_parameters"]) == sorted(TP)
    keys = {e["key"] for e in s["expert_lora"]}
    assert "model.layers.0.mlp.experts" in keys and "model.layers.0.mlp.experts.base_layer" in keys
    assert all(sorted(e["parameters"]) == sorted(f"model.layers.{e['module'].split('.')[2]}.{p}" for p in TP)
               for e in s["expert_lora"])
    for args in (["interpolate", ad, ad, "--t", "0.5", "--out", tmp_path / "o"],
                 ["merge", ad, ad, "--into-adapter", "--method", "svd", "--rank", "2", "--out", tmp_path / "o"]):
        capsys.readouterr()
        assert run(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "MoE expert parameters" in err[0] and "only cat" in err[0], err


def test_cat_of_expert_adapters_is_exact_and_peft_loads_it(moe, tmp_path):
    from peft import PeftModel

    kind, base = moe
    a = make_expert_adapter(base, tmp_path / "a", seed=1, target_parameters=TP)
    b = make_expert_adapter(base, tmp_path / "b", seed=2, target_parameters=TP, r=3, lora_alpha=5,
                            target_modules=["q_proj", "v_proj"])
    _, want_logits, _ = peft_merged(base, [a, b])  # PEFT merging both
    assert run(["merge", a, b, "--into-adapter", "--method", "cat", "--out", tmp_path / "c"]) == 0
    assert run(["stack", a, b, "--out", tmp_path / "s"]) == 0
    cfg = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == sorted(TP)
    for folder in (tmp_path / "c", tmp_path / "s"):
        peft = PeftModel.from_pretrained(load_model(base), str(folder)).eval()
        with torch.no_grad():
            got = peft(input_ids()).logits
        torch.testing.assert_close(got, want_logits, rtol=1e-5, atol=1e-5)
    assert run(["merge", base, tmp_path / "c", "--out", tmp_path / "m"]) == 0
    with torch.no_grad():
        merged = load_model(tmp_path / "m")(input_ids()).logits
    torch.testing.assert_close(merged, want_logits, rtol=1e-5, atol=1e-5)


def write_fused(base: Path, out: Path) -> Path:
    """``base`` re-saved with the in-memory (fused 3-D) expert tensors, as our own writer would."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(base, out)
    state = {k: v.contiguous() for k, v in load_model(base).state_dict().items()}
    assert state["model.layers.0.mlp.experts.gate_up_proj"].dim() == 3
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral", "gpt_oss", "gpt_oss_square"])
def fused_moe(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    base = make_moe(root / request.param, request.param)
    if not request.param.startswith("gpt_oss"):
        base = write_fused(base, root / "fused")
    return request.param, base


@pytest.mark.parametrize("kw", [
    {"target_parameters": TP},
    {"target_parameters": TP, "rank_pattern": {"mlp.experts.down_proj": 3}, "use_rslora": True},
], ids=["both", "rank_pattern_rslora"])
def test_expert_lora_merges_into_a_fused_expert_checkpoint_like_peft(fused_moe, tmp_path, kw):
    from safetensors import safe_open

    kind, base = fused_moe
    with safe_open(base / "model.safetensors", "pt") as f:  # the base really stores the fused tensors
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert len(shapes["model.layers.0.mlp.experts.gate_up_proj"]) == 3
    assert not any(".experts.0." in k for k in shapes)
    ad = make_expert_adapter(base, tmp_path / "a", **kw)
    want, want_logits, peft_logits = peft_merged(base, [ad])
    assert run(["merge", base, ad, "--out", tmp_path / "m"]) == 0
    got = {k: v for f in sorted((tmp_path / "m").glob("*.safetensors")) for k, v in load_file(f).items()}
    orig = load_file(base / "model.safetensors")
    for p in TP:
        k = f"model.layers.1.{p}"
        assert got[k].shape == orig[k].shape and not torch.equal(got[k], orig[k]), k
    assert set(got) == set(want)
    for k, w in want.items():  # every tensor, the fused experts included, as PEFT merges them
        err = (got[k].float() - w.float()).norm()
        assert err <= 1e-5 * w.float().norm(), (k, err)
    with torch.no_grad():
        lg = load_model(tmp_path / "m")(input_ids()).logits
    torch.testing.assert_close(lg, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lg, peft_logits, rtol=1e-4, atol=1e-5)


def test_a_square_fused_expert_tensor_alone_is_refused_by_name(tmp_path, capsys):
    # GPT-OSS with intermediate == hidden: down_proj (E, 32, 32) cannot tell (E, out, in) from
    # (E, in, out); with gate_up_proj beside it (test above) it takes its orientation, alone it is refused
    base = make_moe(tmp_path / "g", "gpt_oss_square")
    ad = make_expert_adapter(base, tmp_path / "a", target_parameters=["mlp.experts.down_proj"])
    capsys.readouterr()
    assert run(["merge", base, ad, "--out", tmp_path / "m"]) == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "cannot tell" in err[0] and "mlp.experts" in err[0], err
    assert not (tmp_path / "m").exists()


def test_inspect_human_view_names_expert_lora(tmp_path, capsys):
    base = make_moe(tmp_path / "q", "qwen3_moe")
    ad = make_expert_adapter(base, tmp_path / "a", target_parameters=TP)
    capsys.readouterr()
    assert run(["inspect", ad]) == 0
    out = capsys.readouterr().out
    assert "expert LoRA" in out and "4 wrappers" in out and "gate_up_proj" in out
