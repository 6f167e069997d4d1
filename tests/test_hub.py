"""`adapters push` / `adapters pull` against our Hub-compatible server on 127.0.0.1,
driven through the real huggingface_hub client (regular and LFS uploads, Xet off).

huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_DISABLE_XET / HF_TOKEN_PATH when it is
first imported, which in one pytest process happened long before these tests: the
``hub_env`` fixture patches those constants, and our library reads HF_ENDPOINT and
HF_TOKEN at call time. ``test_console_script_with_env_vars`` runs the real `adapters`
script in a fresh process with nothing but environment variables.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hubserver import HubServer
from tiny import make_llama, make_peft_adapter

from adapterhub_local.cli import cli, main

ALICE, BOB = "tok-alice", "tok-bob"


@pytest.fixture(scope="module")
def hub():
    with HubServer(users={ALICE: "alice", BOB: "bob"}) as server:
        yield server


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Every model and adapter the tests need, built while huggingface_hub is still offline
    (transformers and PEFT look things up on the Hub when they may)."""
    root = tmp_path_factory.mktemp("hubmodels")
    base = make_llama(root / "base", max_shard_size="40KB")  # sharded: several LFS files
    other_base = make_llama(root / "other", seed=5, max_shard_size="40KB")  # same shapes, other weights
    return {
        "base": base, "other_base": other_base, "wide_base": make_llama(root / "wide", hidden=48),
        "support": make_peft_adapter(base, root / "support", seed=3),
        "parent": make_peft_adapter(base, root / "parent", seed=11),
        "other": make_peft_adapter(other_base, root / "other-adapter", seed=99),
    }


@pytest.fixture
def base_dir(models):
    return models["base"]


@pytest.fixture
def adapter_dir(models):
    return models["support"]


@pytest.fixture
def hub_env(hub, models, monkeypatch, tmp_path):
    return point_at(hub, monkeypatch, tmp_path)


def point_at(hub, monkeypatch, tmp_path):
    """This process's huggingface_hub and our library, aimed at ``hub`` as user alice."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", ALICE)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    # what importing huggingface_hub with HF_ENDPOINT set would have computed
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
    hub.state.fail_commits = hub.state.drop_commits = 0
    return hub


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ok(*args) -> str:
    res = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.stdout


def fails(capsys, *args) -> str:
    """Run through main(): one line on stderr, exit 1, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(list(args))
    err = capsys.readouterr().err
    assert e.value.code == 1, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def download(hub, repo_id: str, dest: Path, token=ALICE, revision=None) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, local_dir=dest, endpoint=hub.url, token=token))


def make_merged(base: Path, out: Path, inputs: list[tuple[str, float, dict]], base_fp: str) -> Path:
    """A folder laid out as `adapters merge` writes it: weights, config, README, recipe.yaml."""
    shutil.copytree(base, out)
    recipe = {
        "adapterhub_recipe": 1, "tool": "adapterhub-local 0.1.0", "operation": "merge", "method": "linear",
        "base": {"path": str(base.resolve()), "fingerprint": base_fp},
        "inputs": [{"ref": ref, "weight": w, "sha256": files} for ref, w, files in inputs],
        "parameters": {"dtype": "auto"},
    }
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    (out / "README.md").write_text("---\ntags: [merge]\n---\n# merged\n", encoding="utf-8")
    return out


def register(ref_dir: Path, name: str, base: Path, **kw):
    from adapterhub_local.registry import open_registry

    return open_registry().register(ref_dir, name, base_dir=base, **kw)


# -- push ---------------------------------------------------------------------------


def test_push_merged_model_lfs_roundtrip(hub_env, base_dir, adapter_dir, tmp_path):
    from huggingface_hub import ModelCard

    from adapterhub_local.fingerprint import fingerprint_model
    from adapterhub_local.merge import merge_into_base, resolve_inputs

    base_fp = fingerprint_model(base_dir).fingerprint
    rec = register(adapter_dir, "support", base_dir)
    merged = tmp_path / "merged"
    merge_into_base(base_dir, resolve_inputs([rec.ref], weights=[0.7]), merged, max_shard_size="40KB",
                    progress=False, notify=lambda *a, **k: None)
    assert (merged / "recipe.yaml").is_file() and (merged / "README.md").is_file()
    out = ok("push", str(merged), "alice/support-merged", "--base-model", "meta-llama/Llama-3.2-1B")
    assert "pushed" in out and "alice/support-merged" in out

    shards = sorted(p.name for p in merged.glob("*.safetensors"))
    assert len(shards) > 1 and (merged / "model.safetensors.index.json").is_file()
    assert all(hub_env.is_lfs("alice/support-merged", s) for s in shards)  # > regular-upload threshold
    got = download(hub_env, "alice/support-merged", tmp_path / "dl")
    for name in [*shards, "config.json", "model.safetensors.index.json", "recipe.yaml"]:
        assert sha256((got / name).read_bytes()) == sha256((merged / name).read_bytes()), name

    card = ModelCard.load(got / "README.md")
    assert card.data.base_model == "meta-llama/Llama-3.2-1B"
    assert card.data.base_model_relation == "merge"
    assert card.data.library_name == "transformers"
    assert {"merge", "lora", "adapterhub-local"} <= set(card.data.tags)
    assert base_fp in card.text and rec.ref in card.text and rec.files["adapter_model.safetensors"][:16] in card.text
    assert "method: linear" in card.text  # the recipe, verbatim

    prov = json.loads((got / "adapterhub.json").read_text())
    assert prov["kind"] == "merged_model" and prov["base"]["fingerprint"] == base_fp
    assert prov["lineage"]["parents"] == [rec.ref]
    assert prov["lineage"]["inputs"][0]["weight"] == 0.7
    assert prov["model"]["fingerprint"] == fingerprint_model(merged).fingerprint
    for name in shards:
        assert prov["files"][name] == sha256((merged / name).read_bytes())
    assert "README.md" not in prov["files"]


def test_push_adapter_ref_card_metrics_and_hub_record(hub_env, base_dir, adapter_dir, tmp_path):
    from huggingface_hub import ModelCard

    rec = register(adapter_dir, "support", base_dir, metrics={"eval_loss": 1.25, "eval_accuracy": 0.5})
    out = ok("push", "support", "alice/support-lora", "--base-model", "meta-llama/Llama-3.2-1B")
    head = hub_env.head("alice/support-lora")
    assert f"commit {head}" in out

    got = download(hub_env, "alice/support-lora", tmp_path / "dl")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert sha256((got / name).read_bytes()) == rec.files[name]
    assert hub_env.is_lfs("alice/support-lora", "adapter_model.safetensors")
    assert not hub_env.is_lfs("alice/support-lora", "adapter_config.json")

    card = ModelCard.load(got / "README.md")
    assert card.data.library_name == "peft"
    assert card.data.base_model == "meta-llama/Llama-3.2-1B"
    assert card.data.base_model_relation == "adapter"
    assert "base_model:adapter:meta-llama/Llama-3.2-1B" in card.data.tags
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"eval_loss": 1.25, "eval_accuracy": 0.5}
    assert rec.base_fingerprint in card.text and "support@1" in card.text

    prov = json.loads((got / "adapterhub.json").read_text())
    assert prov["registry"]["ref"] == "support@1" and prov["base"]["fingerprint"] == rec.base_fingerprint
    assert prov["metrics"] == {"eval_loss": 1.25, "eval_accuracy": 0.5}
    assert prov["adapter"]["r"] == 4
    # a push to main is the repo's next numbered version: v1, tagged on its commit
    assert prov["team"] == {"repo_id": "alice/support-lora", "version": 1, "metrics": {}}
    assert hub_env.tags("alice/support-lora") == {"v1": head}

    shown = json.loads(ok("show", "support", "--json"))
    assert [(h["repo_id"], h["revision"], h["commit_id"]) for h in shown["hub"]] == [
        ("alice/support-lora", "v1", head)]

    # the same push again: same bytes (adapterhub.json has no push time), no commit, no duplicate record
    out = ok("push", "support", "alice/support-lora", "--base-model", "meta-llama/Llama-3.2-1B")
    assert out.startswith("unchanged") and hub_env.head("alice/support-lora") == head
    assert len(json.loads(ok("show", "support", "--json"))["hub"]) == 1


def test_push_branch_and_pull_request(hub_env, adapter_dir):
    ok("push", str(adapter_dir), "alice/branchy")
    main_head = hub_env.head("alice/branchy")
    out = ok("push", str(adapter_dir), "alice/branchy", "--revision", "exp", "--commit-message", "try",
             "--card", str(_template(adapter_dir.parent)))
    assert "(exp)" in out
    assert hub_env.head("alice/branchy") == main_head  # main untouched
    assert "Team template" in hub_env.files("alice/branchy", "exp")["README.md"].decode()

    res = json.loads(ok("push", str(adapter_dir), "alice/branchy", "--create-pr", "--json",
                        "--card", str(_template(adapter_dir.parent))))
    assert res["revision"] == "refs/pr/1" and res["pr_url"].endswith("/discussions/1")
    assert hub_env.head("alice/branchy", "refs/pr/1") == res["commit_id"]
    assert hub_env.head("alice/branchy") == main_head

    pulled = json.loads(ok("pull", "alice/branchy@refs/pr/1", "--json"))
    assert pulled["commit_id"] == res["commit_id"] and pulled["revision"] == "refs/pr/1"
    assert json.loads(ok("pull", "alice/branchy@exp", "--json"))["commit_id"] == hub_env.head("alice/branchy", "exp")


def test_push_of_a_registered_folder_is_recorded_on_its_version(hub_env, base_dir, adapter_dir):
    rec = register(adapter_dir, "support", base_dir)
    res = json.loads(ok("push", str(adapter_dir), "alice/by-path", "--json"))
    assert res["registry_ref"] == rec.ref
    shown = json.loads(ok("show", rec.ref, "--json"))
    assert [(h["repo_id"], h["commit_id"]) for h in shown["hub"]] == [("alice/by-path", res["commit_id"])]
    prov = json.loads(hub_env.files("alice/by-path")["adapterhub.json"])
    assert prov["registry"]["ref"] == rec.ref and prov["base"]["fingerprint"] == rec.base_fingerprint


def _template(folder: Path) -> Path:
    path = folder / "card_template.md"
    path.write_text("---\nlicense: apache-2.0\n---\n# Team template for {{ model_name }}\n\n{{ files }}\n")
    return path


def test_private_repo_is_invisible_without_token(hub_env, adapter_dir, capsys, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    ok("push", str(adapter_dir), "alice/secret", "--private")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub_env.url, token=False).model_info("alice/secret")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub_env.url, token=BOB).model_info("alice/secret")
    assert HfApi(endpoint=hub_env.url, token=ALICE).model_info("alice/secret").private is True

    monkeypatch.delenv("HF_TOKEN")
    line = fails(capsys, "pull", "alice/secret")
    assert "alice/secret not found" in line and "--token" in line
    line = fails(capsys, "pull", "alice/secret", "--token", BOB)
    assert "alice/secret not found" in line
    assert "pulled" in ok("pull", "alice/secret", "--token", ALICE)


def test_private_push_never_lands_in_a_public_repo(hub_env, adapter_dir, capsys):
    ok("push", str(adapter_dir), "alice/was-public")
    head = hub_env.head("alice/was-public")
    (adapter_dir.parent / "card2.md").write_text("# secret notes")
    line = fails(capsys, "push", str(adapter_dir), "alice/was-public", "--private", "--card",
                 str(adapter_dir.parent / "card2.md"))
    assert "already exists and is public" in line
    assert hub_env.head("alice/was-public") == head


def test_token_errors(hub_env, adapter_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    line = fails(capsys, "push", str(adapter_dir), "alice/x")
    assert "rejected the token (401" in line
    line = fails(capsys, "push", str(adapter_dir), "alice/x", "--token", "also-wrong")
    assert "rejected the token (401" in line
    monkeypatch.delenv("HF_TOKEN")
    hub_env.clear_requests()
    line = fails(capsys, "push", str(adapter_dir), "alice/x")
    assert "no Hugging Face token" in line and "hf auth login" in line
    assert hub_env.requests == []
    assert "alice/x" not in hub_env.state.repos


def test_someone_elses_repo_is_refused(hub_env, adapter_dir, capsys):
    ok("push", str(adapter_dir), "alice/public-lora")
    head = hub_env.head("alice/public-lora")
    line = fails(capsys, "push", str(adapter_dir), "alice/public-lora", "--token", BOB, "--card",
                 str(_template(adapter_dir.parent)))
    assert "user 'bob' may not write to alice/public-lora (403" in line
    assert hub_env.head("alice/public-lora") == head
    line = fails(capsys, "push", str(adapter_dir), "alice/new-one", "--token", BOB)
    assert "(403" in line and "bob" in line
    assert "alice/new-one" not in hub_env.state.repos


@pytest.mark.parametrize("repo_id", ["nonamespace", "a/b/c", "alice/bad name", "alice/-x", "alice/x..y",
                                     "alice/x.git", "/x", "alice/"])
def test_malformed_repo_id_fails_before_network(hub_env, adapter_dir, capsys, repo_id):
    hub_env.clear_requests()
    line = fails(capsys, "push", str(adapter_dir), repo_id)
    assert "invalid repo id" in line
    line = fails(capsys, "pull", repo_id)
    assert "invalid repo id" in line
    assert hub_env.requests == []


def test_server_error_mid_upload_then_rerun_finishes(hub_env, base_dir, tmp_path, capsys):
    merged = make_merged(base_dir, tmp_path / "merged", [], "sha256:" + "0" * 64)
    hub_env.clear_requests()
    hub_env.state.fail_commits = 1  # LFS objects go up, then the commit gets a 500
    line = fails(capsys, "push", str(merged), "alice/flaky")
    assert "failed during upload (HTTP 500" in line and "run the same command again" in line
    puts = [p for m, p in hub_env.requests if m == "PUT"]
    assert len(puts) == len(list(merged.glob("*.safetensors")))
    assert set(hub_env.files("alice/flaky")) == {".gitattributes"}  # nothing half-committed

    hub_env.clear_requests()
    ok("push", str(merged), "alice/flaky")
    assert [p for m, p in hub_env.requests if m == "PUT"] == []  # LFS objects were not sent again
    assert hub_env.files("alice/flaky")["config.json"] == (merged / "config.json").read_bytes()

    # a server that dies mid-request (connection closed, no answer)
    (merged / "extra.txt").write_text("more")
    hub_env.state.drop_commits = 1
    line = fails(capsys, "push", str(merged), "alice/flaky")
    assert "cannot reach the Hub" in line and "during upload" in line and "run the same command again" in line
    ok("push", str(merged), "alice/flaky")
    assert hub_env.files("alice/flaky")["extra.txt"] == b"more"


def test_server_down(hub_env, adapter_dir, capsys, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    line = fails(capsys, "push", str(adapter_dir), "alice/x")
    assert f"cannot reach the Hub at http://127.0.0.1:{port}" in line
    line = fails(capsys, "pull", "alice/x")
    assert "cannot reach the Hub" in line


def test_xet_against_an_lfs_only_hub_says_what_to_set(hub_env, adapter_dir, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)  # hf_xet is installed: it would be used
    line = fails(capsys, "push", str(adapter_dir), "alice/xet")
    assert "does not speak the Xet transfer protocol" in line and "HF_HUB_DISABLE_XET=1" in line


def test_offline_mode_is_reported(hub_env, adapter_dir, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE" in fails(capsys, "push", str(adapter_dir), "alice/x")
    assert "HF_HUB_OFFLINE" in fails(capsys, "pull", "alice/x")


def test_dry_run_touches_no_network(hub_env, base_dir, adapter_dir, tmp_path, monkeypatch):
    rec = register(adapter_dir, "support", base_dir, metrics={"eval_loss": 2.0})
    monkeypatch.delenv("HF_TOKEN")  # no token needed either
    hub_env.clear_requests()
    out_dir = tmp_path / "preview"
    out = ok("push", "support@1", "alice/preview", "--dry-run", "--dry-run-dir", str(out_dir))
    assert hub_env.requests == []
    assert "alice/preview" not in hub_env.state.repos
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "adapterhub.json"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert sha256((out_dir / name).read_bytes()) == rec.files[name]
        assert name in out
    assert f"folder: {out_dir}" in out
    listed = json.loads(ok("push", "support@1", "alice/preview", "--dry-run", "--json"))
    assert listed["dry_run"] and {f["path"] for f in listed["files"]} == {p.name for p in out_dir.iterdir()}
    assert hub_env.requests == []
    # the dry-run folder is exactly what a real push uploads
    monkeypatch.setenv("HF_TOKEN", ALICE)
    ok("push", "support@1", "alice/preview")
    pushed = hub_env.files("alice/preview")
    staged = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    # except the version number, which only the Hub's tags can give (adapterhub.json's "team")
    prov = json.loads(pushed.pop("adapterhub.json"))
    staged_prov = json.loads(staged.pop("adapterhub.json"))
    assert prov.pop("team") == {"repo_id": "alice/preview", "version": 1, "metrics": {}}
    staged_prov.pop("team")
    assert prov == staged_prov
    assert pushed == {".gitattributes": pushed[".gitattributes"], **staged}


# -- pull ---------------------------------------------------------------------------


def test_pull_brings_lineage_and_fingerprint(hub_env, models, base_dir, adapter_dir, tmp_path, monkeypatch):
    parent_dir = models["parent"]
    parent = register(parent_dir, "generic", base_dir)
    child = register(adapter_dir, "support", base_dir, parents=[parent.ref], metrics={"eval_loss": 0.9})
    ok("push", "support", "alice/support-with-parent")
    head = hub_env.head("alice/support-with-parent")

    # another machine: a fresh registry that holds the parent too
    monkeypatch.setenv("ADAPTERS_HOME", str(tmp_path / "other-home"))
    register(parent_dir, "generic", base_dir)
    pulled = json.loads(ok("pull", "alice/support-with-parent", "--name", "support", "--json"))
    assert pulled["is_new"] and pulled["ref"] == "support@1" and pulled["commit_id"] == head
    assert pulled["parents_linked"] == ["generic@1"]
    shown = json.loads(ok("show", "support", "--json"))
    assert shown["parents"] == ["generic@1"]
    assert shown["base_fingerprint"] == child.base_fingerprint
    # what the repo says about its metrics is its claim, not a measurement of this registry
    assert shown["metrics"] == {} and shown["claims"] == {"eval_loss": 0.9}
    assert shown["claims_source"] == "alice/support-with-parent@v1"  # main's head is that push's v1
    assert shown["origin"]["repo_id"] == "alice/support-with-parent" and shown["origin"]["commit_id"] == head
    assert shown["files"]["adapter_model.safetensors"] == child.files["adapter_model.safetensors"]
    assert shown["provenance"]["commit_id"] == head
    assert shown["provenance"]["adapterhub"]["registry"]["ref"] == "support@1"
    assert [(h["repo_id"], h["commit_id"]) for h in shown["hub"]] == [("alice/support-with-parent", head)]

    # the same revision again (by commit id this time): no new version, no duplicate hub row
    again = json.loads(ok("pull", f"alice/support-with-parent@{head}", "--name", "support", "--json"))
    assert not again["is_new"] and again["ref"] == "support@1"
    assert len(json.loads(ok("show", "support", "--json"))["hub"]) == 1
    assert json.loads(ok("list", "--json"))  # still readable


def test_pull_back_what_was_pushed_is_the_same_version(hub_env, base_dir, adapter_dir):
    rec = register(adapter_dir, "support", base_dir)
    assert "README.md" in rec.files  # PEFT's own card: the pushed repo has ours instead
    ok("push", "support", "alice/round-trip")
    pulled = json.loads(ok("pull", "alice/round-trip", "--name", "support", "--json"))
    assert not pulled["is_new"] and pulled["ref"] == "support@1"
    assert json.loads(ok("list", "--json"))[0]["ref"] == "support@1"
    assert len(json.loads(ok("list", "--json"))) == 1


def test_pull_checks_base(hub_env, models, base_dir, adapter_dir, capsys):
    register(adapter_dir, "support", base_dir)
    ok("push", "support", "alice/for-base-check")
    wide = models["wide_base"]
    line = fails(capsys, "pull", "alice/for-base-check", "--base", str(wide))
    assert "shape" in line and "q_proj" in line
    other = models["other_base"]
    line = fails(capsys, "pull", "alice/for-base-check", "--name", "fresh", "--base", str(other))
    assert "fingerprint mismatch" in line
    from adapterhub_local.registry import open_registry

    assert "fresh" not in open_registry().names()  # nothing half-done
    out = ok("pull", "alice/for-base-check", "--name", "fresh", "--base", str(other), "--force")
    assert "fresh@1" in out
    out = ok("pull", "alice/for-base-check", "--name", "right", "--base", str(base_dir))
    assert "right@1" in out


def test_pull_plain_peft_repo_without_provenance(hub_env, adapter_dir):
    files = {n: (adapter_dir / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    commit = hub_env.add_repo("carol/plain-lora", files, owner="carol")
    res = CliRunner().invoke(cli, ["pull", "carol/plain-lora"], catch_exceptions=False)
    assert res.exit_code == 0 and "plain-lora@1" in res.stdout
    assert "no adapterhub.json" in res.stderr
    shown = json.loads(ok("show", "plain-lora", "--json"))
    assert shown["provenance"]["commit_id"] == commit and shown["base_fingerprint"] is None


@pytest.mark.parametrize("files,expect", [
    ({"config.json": b"{}", "model.safetensors": b"x" * 100}, "it holds a full model"),
    ({"adapter_config.json": b'{"peft_type": "LORA"}', "adapter_model.bin": b"pickle"}, "pickled"),
    ({"README.md": b"# hi"}, "no adapter_config.json"),
    ({"adapter_config.json": b'{"peft_type": "LORA", "r": 4}', "adapter_model.safetensors": b"garbage!"},
     "not a readable safetensors file"),
    ({"adapter_config.json": b'{"peft_type": "PREFIX_TUNING"}', "adapter_model.safetensors": b"x"},
     "unknown peft_type"),
])
def test_pull_refuses_non_lora_repos(hub_env, capsys, files, expect):
    repo = f"carol/not-lora-{hashlib.sha1(repr(sorted(files)).encode()).hexdigest()[:8]}"
    hub_env.add_repo(repo, files, owner="carol")
    line = fails(capsys, "pull", repo)
    assert "is not a LoRA adapter repo" in line and expect in line
    from adapterhub_local.registry import open_registry

    assert open_registry().names() == []


def test_pull_detects_files_changed_after_publication(hub_env, models, adapter_dir, capsys):
    ok("push", str(adapter_dir), "alice/tampered")
    other = models["other"]
    weights = (other / "adapter_model.safetensors").read_bytes()
    hub_env.add_repo("alice/tampered", {"adapter_model.safetensors": weights})
    line = fails(capsys, "pull", "alice/tampered")
    assert "adapterhub.json records" in line


def test_pull_unknown_revision_and_repo(hub_env, adapter_dir, capsys):
    ok("push", str(adapter_dir), "alice/revs")
    hub_env.clear_requests()
    assert "bad adapter name 'no/slash'" in fails(capsys, "pull", "alice/revs", "--name", "no/slash")
    assert hub_env.requests == []
    assert "revision 'nope' not found" in fails(capsys, "pull", "alice/revs@nope")
    assert "alice/missing not found" in fails(capsys, "pull", "alice/missing")


# -- a fresh process, configured only by environment variables ----------------------


def test_console_script_with_env_vars(hub, adapter_dir, tmp_path):
    # no hub_env here: the child process gets plain environment variables
    script = Path(sys.executable).with_name("adapters")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1",
               ADAPTERS_HOME=str(tmp_path / "home"), ADAPTERS_PROGRESS="0")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "token").write_text(ALICE)  # what `hf auth login` stores

    def run(*args):
        return subprocess.run([str(script), *args], env=env, capture_output=True, text=True, timeout=120,
                              check=False)

    p = run("push", str(adapter_dir), "alice/from-env")
    assert p.returncode == 0, p.stderr
    assert hub.head("alice/from-env") in p.stdout
    p = run("pull", "alice/from-env", "--name", "env")
    assert p.returncode == 0 and "env@1" in p.stdout, p.stderr
    env["HF_TOKEN"] = "wrong"  # HF_TOKEN wins over the stored token
    p = run("push", str(adapter_dir), "alice/from-env")
    assert p.returncode == 1 and p.stderr.startswith("error: ") and "401" in p.stderr
    assert "Traceback" not in p.stderr
