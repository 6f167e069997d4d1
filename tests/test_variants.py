"""Every LoRA variant we do not implement is refused by name in every command; VeLoRA's
training buffer is ignored with a note; unknown lora_* tensors are never modules_to_save.
The adapters are made by PEFT itself."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from clitools import exit_code as run
from safetensors.torch import load_file, save_file
from tiny import make_peft_adapter

from adapterhub_local.variants import FIELDS, IGNORED, REFUSED, SUPPORTED, markdown_table


def _variants():
    from peft import BdLoraConfig, KasaConfig

    return {
        "kasa_config": dict(kasa_config=KasaConfig()),
        "use_bdlora": dict(use_bdlora=BdLoraConfig(target_modules_bd_a=["q_proj"], target_modules_bd_b=["v_proj"],
                                                   nblocks=2)),
        "alora_invocation_tokens": dict(alora_invocation_tokens=[1, 2]),
        "use_qalora": dict(use_qalora=True),
        "trainable_token_indices": dict(trainable_token_indices=[1, 2]),
        "layer_replication": dict(layer_replication=[[0, 1], [1, 2]]),
        "init_lora_weights=pissa": dict(init_lora_weights="pissa"),
        "init_lora_weights=olora": dict(init_lora_weights="olora"),
    }


CASES = ["kasa_config", "use_bdlora", "alora_invocation_tokens", "use_qalora", "trainable_token_indices",
         "layer_replication", "init_lora_weights=pissa", "init_lora_weights=olora",
         "init_lora_weights=corda", "init_lora_weights=loftq"]


@pytest.fixture(scope="module")
def made(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    plain = make_peft_adapter(llama_dir, root / "plain")
    out = {}
    kinds = _variants()
    for case in CASES:
        if case in kinds:
            out[case] = make_peft_adapter(llama_dir, root / case, **kinds[case])
            continue
        # corda / loftq need calibration data or bitsandbytes: a PEFT config with that init
        folder = shutil.copytree(plain, root / case)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["init_lora_weights"] = case.split("=")[1]
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        out[case] = folder
    return out


COMMANDS = {
    "inspect": lambda a, o, base: ["inspect", a],
    "register": lambda a, o, base: ["register", a, "--name", "x"],
    "merge": lambda a, o, base: ["merge", base, a, "--out", o],
    "merge --into-adapter": lambda a, o, base: ["merge", a, a, "--into-adapter", "--out", o],
    "stack": lambda a, o, base: ["stack", a, a, "--out", o],
    "interpolate": lambda a, o, base: ["interpolate", a, a, "--t", "0.5", "--out", o],
    "push": lambda a, o, base: ["push", a, "me/x", "--dry-run", "--dry-run-dir", o],
}


@pytest.mark.parametrize("case", CASES)
def test_variant_is_refused_by_name_in_every_command(case, made, llama_dir, tmp_path, capsys):
    field = case.split("=")[0]
    for cmd, build in COMMANDS.items():
        out = tmp_path / cmd.replace(" ", "_")
        capsys.readouterr()
        code = run(build(made[case], out, llama_dir))
        err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert code == 1, (cmd, err)
        assert len(err) == 1 and err[0].startswith("error: "), (cmd, err)
        assert f"{field}=" in err[0] and "is not supported" in err[0], (cmd, err)
        if "=" in case:
            assert case.split("=")[1] in err[0]
        assert "Traceback" not in err[0] and not out.exists()


def test_velora_buffer_is_ignored_with_a_note_and_merges_like_peft(llama_dir, tmp_path, capsys):
    from peft import VeloraConfig
    from tiny import logits, peft_logits

    ad = make_peft_adapter(llama_dir, tmp_path / "velora", velora_config=VeloraConfig())
    assert any("lora_velora_embed" in k for k in load_file(ad / "adapter_model.safetensors"))
    capsys.readouterr()
    assert run(["inspect", ad, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["modules_to_save"] == [] and s["num_modules"] == 4
    assert len(s["notes"]) == 4 and all("lora_velora_embed" in n and "plain LoRA" in n for n in s["notes"])
    assert run(["inspect", ad]) == 0
    assert "note: ignored" in capsys.readouterr().err
    assert run(["merge", llama_dir, ad, "--out", tmp_path / "m"]) == 0
    torch.testing.assert_close(logits(tmp_path / "m"), peft_logits(llama_dir, ad), rtol=1e-5, atol=1e-5)


def test_unknown_lora_tensor_is_refused_by_name_never_modules_to_save(llama_dir, tmp_path, capsys):
    ad = make_peft_adapter(llama_dir, tmp_path / "a")
    path = ad / "adapter_model.safetensors"
    t = load_file(path)
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_frobnicate"] = torch.ones(4)
    save_file(t, path, metadata={"format": "pt"})
    for args in (["inspect", ad], ["merge", llama_dir, ad, "--out", tmp_path / "o"], ["stack", ad, ad, "--out",
                                                                                        tmp_path / "o"]):
        capsys.readouterr()
        assert run(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "lora_frobnicate" in err[-1] and "modules_to_save" not in err[-1]
        assert "LoRA variant" in err[-1]


def test_fields_table_names_every_installed_lora_config_field():
    from peft import LoraConfig

    installed = [f.name for f in dataclasses.fields(LoraConfig)]
    assert sorted(FIELDS) == sorted(installed)
    assert {f.status for f in FIELDS.values()} <= {SUPPORTED, IGNORED, REFUSED}
    assert all(f.why for f in FIELDS.values())


def test_docs_formats_table_is_current():
    text = (Path(__file__).parents[1] / "docs" / "formats.md").read_text(encoding="utf-8")
    assert markdown_table() in text, "regenerate: python -c 'from adapterhub_local.variants import " \
        "markdown_table; print(markdown_table())'"
