"""`adapters train --dora`: PEFT's DoRA initialisation, and an adapter PEFT loads with equal logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapterhub_local.trainer.lora_layers import adapter_applied, inject_lora, lora_layers
from test_train import _texts, make_base, write_jsonl
from tiny import input_ids, load_model

from adapterhub_local.cli import main
from adapterhub_local.peft_format import load_adapter


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("dbase") / "llama")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("dbase") / "gpt2", "gpt2")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("ddata") / "text.jsonl", [{"text": t} for t in _texts(48)])


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_dora_init_is_peft_init(which, base, gpt2):
    from peft import LoraConfig, get_peft_model

    folder = base if which == "llama" else gpt2
    targets = ["q_proj", "v_proj"] if which == "llama" else ["c_attn"]
    ours = load_model(folder)
    torch.manual_seed(3)
    inject_lora(ours, targets, r=4, alpha=8, dora=True)
    theirs = load_model(folder)
    torch.manual_seed(3)
    peft = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                                             fan_in_fan_out=which == "gpt2"))
    sd = peft.state_dict()
    layers = lora_layers(ours)
    assert layers
    for name, layer in layers.items():
        a, b = layer.factors
        assert torch.equal(a, sd[f"base_model.model.{name}.lora_A.default.weight"])
        assert torch.equal(b, torch.zeros_like(b))
        torch.testing.assert_close(layer.lora_magnitude_vector,
                                   sd[f"base_model.model.{name}.lora_magnitude_vector.default.weight"],
                                   rtol=1e-6, atol=1e-7)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in trainable)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_train_dora_writes_an_adapter_peft_loads_with_equal_logits(which, base, gpt2, data, tmp_path):
    from peft import PeftModel

    folder = base if which == "llama" else gpt2
    targets = "q_proj,v_proj" if which == "llama" else "c_attn,c_fc"
    out = tmp_path / "run"
    try:
        main(["train", str(folder), "--data", str(data), "--out", str(out), "--dora", "--rank", "4",
              "--alpha", "8", "--targets", targets, "--max-steps", "6", "--batch-size", "4", "--lr", "0.02",
              "--no-register", "--dropout", "0.1"])
    except SystemExit as e:
        assert e.code == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    ad = load_adapter(out)
    assert len(ad.dora_modules) == len(ad.modules) > 0
    init = {}
    for name, m in ad.modules.items():
        w = load_model(folder).get_submodule(name).weight.float()
        init[name] = torch.linalg.norm(w.T if m.fan_in_fan_out else w, dim=1)
    # training moved the magnitudes and B away from their init
    assert any(not torch.allclose(torch.from_numpy(m.magnitude), init[n]) for n, m in ad.modules.items())
    assert all(abs(m.B).max() > 0 for m in ad.modules.values())
    peft = PeftModel.from_pretrained(load_model(folder), str(out)).eval()
    with torch.no_grad():
        want = peft(input_ids()).logits
        ours = load_model(folder)
        with adapter_applied(ours, ad):
            got = ours(input_ids()).logits
        plain = load_model(folder)(input_ids()).logits
    assert not torch.allclose(want, plain, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and merged into the base it gives the same logits again
    try:
        main(["merge", str(folder), str(out), "--out", str(tmp_path / "m")])
    except SystemExit as e:
        assert e.code == 0
    with torch.no_grad():
        merged = load_model(Path(tmp_path / "m"))(input_ids()).logits
    torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-5)
