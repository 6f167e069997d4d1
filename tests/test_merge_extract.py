"""`adapters extract` (full-model difference -> LoRA) and registry integration of merges."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tiny import logits, make_gpt2, make_peft_adapter, peft_logits

from adapterhub_local.cli import cli, main
from adapterhub_local.fingerprint import fingerprint_model
from adapterhub_local.merge import resolve_inputs
from adapterhub_local.merge.base import merge_into_base
from adapterhub_local.peft_format import load_adapter


@pytest.fixture(scope="module")
def tuned(llama_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("tuned")
    ad = make_peft_adapter(llama_dir, d / "ad", r=4, target_modules=["q_proj", "v_proj", "up_proj",
                                                                     "embed_tokens"])
    merge_into_base(llama_dir, resolve_inputs([str(ad)]), d / "tuned", progress=False, notify=None)
    return d / "tuned", ad


def test_extract_recovers_the_adapter_exactly(llama_dir, tuned, tmp_path):
    tuned_dir, ad = tuned
    out = tmp_path / "x"
    res = CliRunner().invoke(cli, ["extract", str(llama_dir), str(tuned_dir), "--rank", "4", "--out", str(out),
                                   "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["summary"]["rel_error"] < 1e-5 and rep["summary"]["modules"] == 2 * 3 + 1
    got = load_adapter(out)
    src = load_adapter(ad)
    assert got.modules["model.embed_tokens"].kind == "embedding"
    for name, m in src.modules.items():
        want = m.delta().double()
        torch.testing.assert_close(got.modules[name].delta().double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(peft_logits(llama_dir, out), logits(tuned_dir), rtol=1e-4, atol=1e-4)
    prov = json.loads((out / "adapterhub.json").read_text())
    assert prov["base"]["fingerprint"] == fingerprint_model(llama_dir).fingerprint


def test_extract_energy_gives_per_module_ranks(llama_dir, tuned, tmp_path):
    tuned_dir, _ = tuned
    out = tmp_path / "e"
    res = CliRunner().invoke(cli, ["extract", str(llama_dir), str(tuned_dir), "--rank", "3", "--energy", "0.8",
                                   "--out", str(out), "--json"], catch_exceptions=False)
    rep = json.loads(res.stdout)
    ranks = {m["module"]: m["rank"] for m in rep["modules"]}
    assert max(ranks.values()) <= 3 and min(ranks.values()) >= 1
    assert all(m["energy_kept"] >= 0.8 - 1e-6 or m["rank"] == 3 for m in rep["modules"])
    got = load_adapter(out)  # rank_pattern makes per-module ranks loadable
    assert {n: m.rank for n, m in got.modules.items()} == ranks
    peft_logits(llama_dir, out)  # PEFT loads it too
    # truncation error is reported honestly
    assert 0 < rep["summary"]["rel_error"] < 1
    again = tmp_path / "again"
    CliRunner().invoke(cli, ["merge", "--recipe", str(out / "recipe.yaml"), "--out", str(again)],
                       catch_exceptions=False)
    for p in out.iterdir():
        assert p.read_bytes() == (again / p.name).read_bytes(), p.name


def test_extract_gpt2_conv1d_and_uncaptured_norms(tmp_path):
    base = make_gpt2(tmp_path / "g")
    ad = make_peft_adapter(base, tmp_path / "ad", target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    tuned = tmp_path / "t"
    merge_into_base(base, resolve_inputs([str(ad)]), tuned, progress=False, notify=None)
    t = load_file(tuned / "model-00001-of-00001.safetensors")
    t["transformer.ln_f.weight"] += 0.5  # a change no LoRA can express
    save_file(t, tuned / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    out = tmp_path / "x"
    res = CliRunner().invoke(cli, ["extract", str(base), str(tuned), "--rank", "4", "--out", str(out), "--json"],
                             catch_exceptions=False)
    rep = json.loads(res.stdout)
    assert [m["tensor"] for m in rep["summary"]["not_captured"]] == ["transformer.ln_f.weight"]
    assert "not captured: transformer.ln_f.weight" in res.stderr
    got = load_adapter(out)
    assert got.config["fan_in_fan_out"]
    src = load_adapter(ad)
    for name, m in src.modules.items():
        torch.testing.assert_close(got.modules[name].delta().double(), m.delta().double(), rtol=1e-4, atol=1e-5)


def test_extract_identical_models_is_an_error(llama_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["extract", str(llama_dir), str(llama_dir), "--rank", "2", "--out", str(tmp_path / "o")])
    assert e.value.code == 1
    assert "identical" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_register_merge_lineage_and_replay_by_reference(llama_dir, tmp_path):
    from adapterhub_local.registry import open_registry

    a = make_peft_adapter(llama_dir, tmp_path / "a", seed=1)
    b = make_peft_adapter(llama_dir, tmp_path / "b", seed=2, r=2)
    reg = open_registry()
    reg.register(a, "alpha", base_dir=llama_dir)
    reg.register(b, "beta", base_dir=llama_dir)
    out = tmp_path / "combo"
    res = CliRunner().invoke(cli, ["merge", "alpha", "beta@1", "--into-adapter", "--method", "cat",
                                   "--weights", "0.6,0.4", "--out", str(out), "--register", "combo", "--json"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["registered"]["ref"] == "combo@1"
    reg = open_registry()
    rec = reg.resolve("combo")
    assert sorted(rec.parents) == ["alpha@1", "beta@1"]
    assert rec.base_fingerprint == fingerprint_model(llama_dir).fingerprint
    merge = reg.merge(rep["registered"]["merge_id"])
    assert merge["method"] == "cat" and merge["output_version"] == "combo@1"
    assert [i["ref"] for i in merge["inputs"]] == ["alpha@1", "beta@1"]
    recipe_text = (out / "recipe.yaml").read_text()
    assert "ref: alpha@1" in recipe_text and "adapter_model.safetensors:" in recipe_text
    # merging the registered result into the base verifies its fingerprint from the registry
    merged = tmp_path / "merged"
    res = CliRunner().invoke(cli, ["merge", str(llama_dir), "combo", "--out", str(merged), "--json",
                                   "--register", "combo-merged"], catch_exceptions=False)
    rep = json.loads(res.stdout)
    assert rep["fingerprint"]["verified"] and not rep["fingerprint"]["unknown"]
    assert open_registry().merge(rep["registered"]["merge_id"])["output"] == str(merged.resolve())
    # replay of the registered recipe by reference gives the same bytes
    again = tmp_path / "again"
    CliRunner().invoke(cli, ["merge", "--recipe", str(out / "recipe.yaml"), "--out", str(again)],
                       catch_exceptions=False)
    for p in out.iterdir():
        assert p.read_bytes() == (again / p.name).read_bytes(), p.name


def test_every_verb_has_help_with_an_example():
    for verb in ("merge", "interpolate", "stack", "extract"):
        res = CliRunner().invoke(cli, [verb, "--help"])
        assert res.exit_code == 0 and "Example" in res.output and f"adapters {verb}" in res.output


def test_exported_provenance_is_verified_and_merges_are_recorded(llama_dir, tmp_path, capsys):
    import shutil

    from adapterhub_local.registry import open_registry
    from tiny import make_llama

    a = make_peft_adapter(llama_dir, tmp_path / "a", seed=1)
    reg = open_registry()
    reg.register(a, "alpha", base_dir=llama_dir)
    exported = reg.export("alpha", tmp_path / "exported")
    assert (exported / "adapterhub.json").is_file()
    other = make_llama(tmp_path / "other", seed=7)  # same shapes, different weights
    with pytest.raises(SystemExit) as e:
        main(["merge", str(other), str(exported), "--out", str(tmp_path / "o")])
    assert e.value.code == 1
    assert "fingerprint mismatch" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # a plain merge (no --register) is still recorded, since a registry exists
    res = CliRunner().invoke(cli, ["merge", str(llama_dir), str(exported), "--out", str(tmp_path / "m"),
                                   "--json"], catch_exceptions=False)
    rep = json.loads(res.stdout)
    assert rep["fingerprint"]["verified"] and rep["registered"]["merge_id"]
    rec = open_registry().merge(rep["registered"]["merge_id"])
    assert rec["inputs"][0]["ref"] == "alpha@1" and rec["recipe"]["operation"] == "merge"
    shutil.rmtree(tmp_path / "m")


def test_extract_register(llama_dir, tuned, tmp_path):
    from adapterhub_local.registry import open_registry

    tuned_dir, _ = tuned
    res = CliRunner().invoke(cli, ["extract", str(llama_dir), str(tuned_dir), "--rank", "4", "--out",
                                   str(tmp_path / "x"), "--register", "extracted", "--json"],
                             catch_exceptions=False)
    rep = json.loads(res.stdout)
    rec = open_registry().resolve(rep["registered"]["ref"])
    assert rec.base_fingerprint == fingerprint_model(llama_dir).fingerprint
    assert open_registry().merge(rep["registered"]["merge_id"])["method"] == "svd"
