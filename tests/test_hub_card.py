"""Cards, provenance and the push/pull checks that need no server (all offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from tiny import make_peft_adapter

from adapterhub_local.cli import cli, main


@pytest.fixture(scope="module")
def adapter(llama_dir, tmp_path_factory):
    return make_peft_adapter(llama_dir, tmp_path_factory.mktemp("cardad") / "legal", seed=7)


def dry_run(*args) -> dict:
    res = CliRunner().invoke(cli, ["push", *args, "--dry-run", "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def card_of(staged) -> object:
    from huggingface_hub import ModelCard

    return ModelCard.load(f"{staged}/README.md")


def error_line(capsys, *args, code=1) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(list(args))
    err = capsys.readouterr().err
    assert e.value.code == code, err
    assert "Traceback" not in err
    return err.strip()


def test_adapter_card_without_a_hub_base_claims_no_base(adapter):
    res = dry_run(str(adapter), "me/legal")
    card = card_of(res["staged_dir"])
    assert card.data.library_name == "peft"
    assert card.data.get("base_model") is None  # the adapter records a local path, not a Hub id
    assert card.data.get("base_model_relation") is None
    assert {"peft", "lora", "adapterhub-local"} <= set(card.data.tags)
    assert "merge" not in card.data.tags
    assert "rank 4" in card.text and "PeftModel.from_pretrained" in card.text
    prov = json.loads((Path(res["staged_dir"]) / "adapterhub.json").read_text())
    assert prov["kind"] == "adapter" and prov["registry"] is None and prov["base"]["fingerprint"] is None


def test_merged_card_lists_several_bases(llama_dir, tmp_path):
    merged = tmp_path / "merged"
    shutil.copytree(llama_dir, merged)
    (merged / "recipe.yaml").write_text(yaml.safe_dump({
        "operation": "merge", "method": "linear", "base": {"path": str(llama_dir), "fingerprint": "sha256:" + "a" * 64},
        "inputs": [{"ref": "org/lora-a", "weight": 0.5, "sha256": {"adapter_model.safetensors": "b" * 64}},
                   {"ref": "org/lora-b", "weight": 0.5, "sha256": {"adapter_model.safetensors": "c" * 64}}],
    }))
    res = dry_run(str(merged), "me/merged", "--base-model", "org/base-7b", "--base-model", "org/other-7b")
    card = card_of(res["staged_dir"])
    assert card.data.base_model == ["org/base-7b", "org/other-7b"]
    assert card.data.base_model_relation == "merge" and card.data.library_name == "transformers"
    assert "merge" in card.data.tags
    assert "`org/lora-a`" in card.text and "b" * 16 in card.text and "sha256:" + "a" * 64 in card.text
    # without --base-model, Hub ids among the recipe's inputs are used
    res = dry_run(str(merged), "me/merged2")
    assert card_of(res["staged_dir"]).data.base_model == ["org/lora-a", "org/lora-b"]
    prov = json.loads((Path(res["staged_dir"]) / "adapterhub.json").read_text())
    assert prov["lineage"]["parents"] == ["org/lora-a", "org/lora-b"]
    assert prov["base"]["fingerprint"] == "sha256:" + "a" * 64


def test_merged_adapter_from_the_merge_engine(llama_dir, adapter, tmp_path):
    from adapterhub_local.registry import open_registry

    from adapterhub_local.merge import merge_adapters, resolve_inputs

    reg = open_registry()
    a = reg.register(adapter, "legal", base_dir=llama_dir)
    b = reg.register(make_peft_adapter(llama_dir, tmp_path / "other", seed=8), "tax", base_dir=llama_dir)
    merge_adapters(resolve_inputs([a.ref, b.ref], weights=[0.5, 0.5]), tmp_path / "combo", method="cat",
                   notify=lambda *x, **k: None)
    res = dry_run(str(tmp_path / "combo"), "me/combo")
    prov = json.loads((Path(res["staged_dir"]) / "adapterhub.json").read_text())
    assert prov["kind"] == "adapter" and prov["recipe"]["method"] == "cat"
    assert prov["base"]["fingerprint"] == a.base_fingerprint  # agreed on by both inputs
    assert prov["lineage"]["parents"] == [a.ref, b.ref]
    assert [i["weight"] for i in prov["lineage"]["inputs"]] == [0.5, 0.5]
    card = card_of(res["staged_dir"])
    assert card.data.library_name == "peft" and "merge" in card.data.tags
    assert "`legal@1`" in card.text and "`tax@1`" in card.text and "method: cat" in card.text
    assert sorted(f["path"] for f in res["files"]) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "adapterhub.json", "recipe.yaml"]


def test_user_template_keeps_its_metadata_and_gets_ours(adapter, tmp_path):
    tpl = tmp_path / "tpl.md"
    tpl.write_text("---\nlicense: mit\nlibrary_name: custom-lib\n---\n# {{ model_name }} by the legal team\n\n"
                   "{{ summary }}\n\n{{ files }}\n")
    res = dry_run(str(adapter), "me/legal", "--card", str(tpl), "--base-model", "org/base")
    card = card_of(res["staged_dir"])
    assert card.data.license == "mit" and card.data.library_name == "custom-lib"  # the template wins
    assert card.data.base_model == "org/base" and card.data.base_model_relation == "adapter"  # we fill in
    assert card.text.startswith("# legal by the legal team") and "adapter_model.safetensors" in card.text

    bare = tmp_path / "bare.md"
    bare.write_text("Just words. {{ details }}")
    card = card_of(dry_run(str(adapter), "me/legal", "--card", str(bare))["staged_dir"])
    assert card.data.library_name == "peft" and "Just words." in card.text and "## Files" in card.text


def test_bad_template_is_one_line(adapter, tmp_path, capsys):
    tpl = tmp_path / "broken.md"
    tpl.write_text("{% if %}")
    assert "template error" in error_line(capsys, "push", str(adapter), "me/x", "--dry-run", "--card", str(tpl))
    assert "cannot read the card template" in error_line(capsys, "push", str(adapter), "me/x", "--dry-run",
                                                          "--card", str(tmp_path / "missing.md"))


def test_training_leftovers_are_not_published(adapter, tmp_path):
    folder = tmp_path / "trained"
    shutil.copytree(adapter, folder)
    for junk in ("optimizer.pt", "trainer_state.json", "rng_state_0.pth", ".hidden", "adapter_model.bin"):
        (folder / junk).write_bytes(b"x")
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "adapter_model.safetensors").write_bytes(b"x")
    (folder / "tokenizer.json").write_text("{}")
    res = dry_run(str(folder), "me/trained")
    assert sorted(f["path"] for f in res["files"]) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "adapterhub.json", "tokenizer.json"]


def test_staging_is_deterministic(adapter, tmp_path):
    a = dry_run(str(adapter), "me/legal", "--dry-run-dir", str(tmp_path / "a"))
    b = dry_run(str(adapter), "me/legal", "--dry-run-dir", str(tmp_path / "b"))
    assert [(f["path"], f["sha256"]) for f in a["files"]] == [(f["path"], f["sha256"]) for f in b["files"]]
    for name in ("README.md", "adapterhub.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_dry_run_dir_must_be_new_or_empty(adapter, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep me")
    assert "not empty" in error_line(capsys, "push", str(adapter), "me/x", "--dry-run", "--dry-run-dir", str(full))
    assert (full / "x").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    dry_run(str(adapter), "me/x", "--dry-run-dir", str(empty))
    assert (empty / "adapterhub.json").is_file()
    err = error_line(capsys, "push", str(adapter), "me/x", "--dry-run-dir", str(tmp_path / "z"), code=2)
    assert "--dry-run-dir only makes sense with --dry-run" in err


def test_push_refuses_what_it_cannot_publish(tmp_path, capsys, adapter):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    assert "neither a PEFT adapter" in error_line(capsys, "push", str(tmp_path / "junk"), "me/x", "--dry-run")
    assert "no such file" in error_line(capsys, "push", "./nope", "me/x", "--dry-run")
    assert "no adapter matches 'nope'" in error_line(capsys, "push", "nope", "me/x", "--dry-run")
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not tensors")
    assert "not a readable safetensors" in error_line(capsys, "push", str(broken), "me/x", "--dry-run")
    assert "--create-pr opens a pull request against main" in error_line(
        capsys, "push", str(adapter), "me/x", "--create-pr", "--revision", "dev")


@pytest.mark.parametrize("repo_id,ok", [
    ("me/x", True), ("my-org/llama-3.2_lora.v1", True), ("A1/b", True),
    ("x", False), ("a/b/c", False), ("me/", False), ("/x", False), ("me/x y", False), ("me/-x", False),
    ("me/x-", False), ("me/a--b", False), ("me/a..b", False), ("me/x.git", False), ("me/" + "a" * 97, False),
    ("me/é", False),
])
def test_validate_repo_id(repo_id, ok):
    from adapterhub_local.hub.common import validate_repo_id
    from adapterhub_local.hub.errors import InvalidRepoId

    if ok:
        assert validate_repo_id(repo_id) == repo_id
    else:
        with pytest.raises(InvalidRepoId):
            validate_repo_id(repo_id)


def test_split_repo_spec():
    from adapterhub_local.hub.common import split_repo_spec
    from adapterhub_local.hub.errors import InvalidRepoId

    assert split_repo_spec("me/x") == ("me/x", None)
    assert split_repo_spec("me/x@v2") == ("me/x", "v2")
    assert split_repo_spec("me/x@refs/pr/1") == ("me/x", "refs/pr/1")
    with pytest.raises(InvalidRepoId):
        split_repo_spec("me/x@")


def test_help_teaches():
    for verb in ("push", "pull"):
        out = CliRunner().invoke(cli, [verb, "--help"]).output
        assert "Example" in out and f"adapters {verb}" in out
    assert "HF_ENDPOINT" in CliRunner().invoke(cli, ["push", "--help"]).output


def test_hub_modules_do_not_import_huggingface_hub_at_cli_start():
    import subprocess
    import sys

    code = "import sys, adapterhub_local.cli, adapterhub_local.hub; print('huggingface_hub' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]
