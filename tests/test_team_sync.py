# ruff: noqa: F811  (env, hub and models are pytest fixtures imported from test_team)
"""`adapters sync ORG` (issue 15, item 6): metadata always, weights with --weights.

Machine A pushes; machine B (another registry home) syncs: every version it lacks becomes a
metadata-only record (version, commit, base fingerprint, rank, targets, claimed metrics,
the team's aliases) that every command needing weights refuses in one line, until `pull`
(or `sync --weights`) fills in its weights in the same record. Also: the schema step that
lets a version exist without blobs, applied to an existing registry by several processes
at once."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from test_hub import ALICE, BOB, fails, ok
from test_team import ORG, env, hub, js, machine, models  # noqa: F401  (fixtures and helpers)

_ORGS = itertools.count(1)


def use_org(env, org: str) -> str:
    env.state.orgs["alice"] = [ORG, org]
    return org


def hint_of(repo: str, tag: str) -> str:
    return f"adapters pull {repo}@{tag}"


@pytest.fixture
def pushed(env, models, tmp_path, monkeypatch):
    """Machine A pushed two versions of sync/support-lora, alias prod -> v1, and logged a metric
    on v1 after the push; returns what B should see."""
    org = use_org(env, f"sync{next(_ORGS)}")  # one namespace per test: the test Hub lives for the module
    repo = f"{org}/support-lora"
    machine(monkeypatch, tmp_path, "A")
    base = str(models["base"])
    ok("register", str(models["a1"]), "--name", "support", "--base", base, "--metric", "eval_loss=1.5")
    ok("register", str(models["a2"]), "--name", "support", "--base", base, "--metric", "eval_loss=1.2")
    p1, p2 = js("push", "support@1", repo), js("push", "support@2", repo)
    ok("remote", "alias", repo, "prod", "v1")
    ok("log-metric", "support@1", "win_rate=0.6", "--push")
    a1 = js("show", "support@1")
    return {"org": org, "repo": repo, "c1": p1["commit_id"], "c2": p2["commit_id"], "a1": a1}


def test_sync_records_metadata_only_and_pull_fills_the_same_record(env, models, pushed, tmp_path, monkeypatch,
                                                                  capsys):
    org, repo, a1 = pushed["org"], pushed["repo"], pushed["a1"]
    machine(monkeypatch, tmp_path, "B")
    res = js("sync", org)
    assert res["missing"] == [f"{repo}@v1", f"{repo}@v2"] and res["pulled"] == [] and res["problems"] == []
    assert [(r["tag"], r["ref"], r["is_new"]) for r in res["recorded"]] == [
        ("v1", "support-lora@1", True), ("v2", "support-lora@2", True)]
    assert res["aliases_set"] == ["support-lora:prod -> support-lora@1"]
    assert res["metadata_only"] == ["support-lora@1", "support-lora@2"]

    v1 = js("show", "support-lora@1")
    assert v1["weights"] == "metadata" and v1["files"] == {} and v1["size"] == 0
    assert v1["origin"]["repo_id"] == repo and v1["origin"]["version"] == "v1"
    assert v1["origin"]["commit_id"] == pushed["c1"] and v1["hub"][0]["revision"] == "v1"
    assert v1["base_fingerprint"] == a1["base_fingerprint"] and v1["rank"] == a1["rank"] == 4
    assert v1["targets"] == a1["targets"] and v1["alpha"] == a1["alpha"]
    assert v1["metrics"] == {} and v1["claims"] == {"eval_loss": 1.5, "win_rate": 0.6}
    assert v1["aliases"] == ["prod"] and js("show", "support-lora@2")["claims"] == {"eval_loss": 1.2}
    # the content hash a pull must match: adapterhub.json's file hashes, which are A's files
    assert v1["provenance"]["files"] == {k: a1["files"][k] for k in ("adapter_config.json",
                                                                     "adapter_model.safetensors")}

    listed = js("list")
    assert [(r["ref"], r["weights"]) for r in listed] == [("support-lora@2", "metadata"),
                                                          ("support-lora@1", "metadata")]
    table = ok("list")
    assert table.count("no weights") == 2
    shown = ok("show", "support-lora:prod")
    assert f"not downloaded (metadata from {repo}@v1)" in shown and "support-lora@1" in shown
    assert "not downloaded" in shown.split("files")[-1] or "files (as its Hub repo lists them" in shown

    # every command that needs the weights: one line naming what to run
    out = tmp_path / "out"
    base, data = str(models["base"]), tmp_path / "d.jsonl"
    data.write_text('{"text": "w1 w2"}\n')
    for args in (["export", "support-lora@1", str(out)],
                 ["merge", base, "support-lora@1", "--out", str(out)],
                 ["merge", str(models["a1"]), "support-lora:prod", "--into-adapter", "--method", "cat",
                  "--out", str(out)],
                 ["stack", str(models["a1"]), "support-lora@1", "--out", str(out)],
                 ["interpolate", str(models["a1"]), "support-lora@1", "--t", "0.5", "--out", str(out)],
                 ["push", "support-lora@1", f"{org}/elsewhere"],
                 ["check", "support-lora@1", "--for", "vllm"],
                 ["convert", "support-lora@1", "--for", "vllm", "--out", str(out)],
                 ["eval", "support-lora@1", "--base", base, "--data", str(data)],
                 ["sweep", "support-lora@1", str(models["a1"]), "--base", base, "--data-a", str(data),
                  "--data-b", str(data)]):
        line = fails(capsys, *args)
        assert "support-lora@1 has no weights here (metadata only" in line, (args, line)
        assert hint_of(repo, "v1") in line and f"adapters sync {org} --weights" in line, (args, line)
        assert not out.exists()
    assert "elsewhere" not in str(env.state.repos.keys())  # push sent nothing
    # verify and gc know them: not a problem, nothing to collect
    text = ok("verify")
    assert "metadata only support-lora@1" in text and text.strip().endswith("0 orphan(s)")
    assert js("verify", "support-lora@1")["metadata_only"] == ["support-lora@1"]
    assert js("gc")["blobs_removed"] == 0

    # a second sync changes nothing
    before = js("list")
    again = js("sync", org)
    assert again["missing"] == [] and again["recorded"] == [] and again["aliases_set"] == []
    assert again["aliases_removed"] == [] and again["aliases_kept"] == []
    assert js("list") == before

    # pull fills in v1's weights: the same record, the bytes A pushed
    pulled = js("pull", f"{repo}@v1")
    assert pulled["filled"] and pulled["ref"] == "support-lora@1" and not pulled["is_new"]
    assert "filled in support-lora@2: the weights of" in ok("pull", f"{repo}@v2")
    after = js("list")
    assert [(r["ref"], r["weights"]) for r in after] == [("support-lora@2", "present"),
                                                         ("support-lora@1", "present")]
    v1 = js("show", "support-lora@1")
    assert v1["files"] == {k: a1["files"][k] for k in ("adapter_config.json", "adapter_model.safetensors")}
    assert v1["claims"] == {"eval_loss": 1.5, "win_rate": 0.6} and v1["aliases"] == ["prod"]
    ok("export", "support-lora:prod", str(out))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).read_bytes() == (models["a1"] / name).read_bytes()
    assert js("verify")["metadata_only"] == [] and js("verify")["ok"]
    assert js("sync", org)["recorded"] == []


def test_sync_weights_pulls_all_and_fills_what_was_metadata(env, models, pushed, tmp_path, monkeypatch):
    org, repo = pushed["org"], pushed["repo"]
    machine(monkeypatch, tmp_path, "B")
    ok("register", str(models["a3"]), "--name", "local-only")
    assert [r["tag"] for r in js("sync", org)["recorded"]] == ["v1", "v2"]
    ok("pull", f"{repo}@v1")
    res = js("sync", org, "--weights")
    assert [(p["tag"], p["ref"], p["filled"]) for p in res["pulled"]] == [("v2", "support-lora@2", True)]
    assert res["metadata_only"] == [] and res["not_on_hub"] == ["local-only@1"]
    assert sorted(r["ref"] for r in js("list")) == ["local-only@1", "support-lora@1", "support-lora@2"]
    out = tmp_path / "v2"
    ok("export", "support-lora@2", str(out))
    assert (out / "adapter_model.safetensors").read_bytes() == env.files(repo, "v2")["adapter_model.safetensors"]
    assert js("sync", org, "--weights")["pulled"] == []

    # a third machine: --weights straight away registers both with their weights
    machine(monkeypatch, tmp_path, "C")
    res = js("sync", org, "--weights")
    assert [(p["tag"], p["is_new"], p["filled"]) for p in res["pulled"]] == [("v1", True, False),
                                                                              ("v2", True, False)]
    assert [r["weights"] for r in js("list")] == ["present", "present"]
    assert js("show", "support-lora:prod")["version"] == 1


def test_aliases_follow_the_team_but_never_move_one_set_here(env, models, pushed, tmp_path, monkeypatch, capsys):
    org, repo = pushed["org"], pushed["repo"]
    machine(monkeypatch, tmp_path, "B")
    ok("remote", "alias", repo, "canary", "v2")
    ok("remote", "alias", repo, "staging", "v2")
    res = js("sync", org)
    assert res["aliases_set"] == ["support-lora:canary -> support-lora@2", "support-lora:prod -> support-lora@1",
                                  "support-lora:staging -> support-lora@2"]
    ok("alias", "support-lora@1", "staging")  # set here: sync must leave it
    ok("remote", "alias", repo, "prod", "v2")  # the team promotes v2
    ok("remote", "alias", repo, "canary", "--rm")
    res = js("sync", org)
    assert res["aliases_set"] == ["support-lora:prod -> support-lora@2 (was support-lora@1)"]
    assert res["aliases_removed"] == [f"support-lora:canary (was support-lora@2; gone from {repo})"]
    assert res["aliases_kept"] == [f"support-lora:staging stays support-lora@1 (set here; {repo}:staging is v2 "
                                   "= support-lora@2)"]
    assert js("show", "support-lora:prod")["version"] == 2
    assert js("show", "support-lora:staging")["version"] == 1
    assert "no adapter matches 'support-lora:canary'" in fails(capsys, "show", "support-lora:canary")
    again = js("sync", org)
    assert again["aliases_set"] == [] and again["aliases_removed"] == [] and len(again["aliases_kept"]) == 1


def test_an_alias_moved_here_by_register_is_set_here(env, models, pushed, tmp_path, monkeypatch):
    """`register --alias` is an alias set here like `adapters alias`: once it moves an alias sync
    took from the team, sync reports it and never moves it back."""
    org, repo = pushed["org"], pushed["repo"]
    machine(monkeypatch, tmp_path, "B")
    assert js("sync", org)["aliases_set"] == ["support-lora:prod -> support-lora@1"]
    assert js("register", str(models["a3"]), "--name", "support-lora", "--alias", "prod")["ref"] == "support-lora@3"
    res = js("sync", org)
    assert res["aliases_set"] == [] and res["aliases_removed"] == []
    assert res["aliases_kept"] == [f"support-lora:prod stays support-lora@3 (set here; {repo}:prod is v1 "
                                   "= support-lora@1)"]
    assert js("show", "support-lora:prod")["version"] == 3


def test_a_team_tag_that_is_no_local_alias_name_is_skipped(env, models, pushed, tmp_path, monkeypatch):
    """Tags made by other tools may be names a local alias cannot have ("latest" means the newest
    version here, "2024" would read as a version number): sync names them and goes on."""
    org, repo = pushed["org"], pushed["repo"]
    env.add_tag(repo, "latest", pushed["c2"])
    env.add_tag(repo, "2024", pushed["c1"])
    machine(monkeypatch, tmp_path, "B")
    res = js("sync", org)
    assert [r["ref"] for r in res["recorded"]] == ["support-lora@1", "support-lora@2"]
    assert res["aliases_set"] == ["support-lora:prod -> support-lora@1"]
    problems = " | ".join(res["problems"])
    assert f"{repo}:latest: not a local alias name" in problems and f"{repo}:2024: not a local alias name" in problems
    assert js("show", "support-lora:prod")["version"] == 1 and js("show", "support-lora:latest")["version"] == 2


def test_register_of_the_exact_bytes_fills_a_metadata_only_version(env, models, pushed, tmp_path, monkeypatch):
    machine(monkeypatch, tmp_path, "B")
    js("sync", pushed["org"])
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_bytes((models["a2"] / name).read_bytes())
    assert "filled in support-lora@2" in ok("register", str(folder), "--name", "support-lora")
    assert [(r["ref"], r["weights"]) for r in js("list")] == [("support-lora@2", "present"),
                                                              ("support-lora@1", "metadata")]
    # other bytes under that name are a new version; the metadata-only one stays as it was
    third = js("register", str(models["a3"]), "--name", "support-lora")
    assert third["ref"] == "support-lora@3" and third["filled"] is False and third["is_new"] is True
    assert js("show", "support-lora@1")["weights"] == "metadata"
    # --json says when the bytes filled a metadata-only version in (as `pull --json` does)
    folder1 = tmp_path / "copy1"
    folder1.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder1 / name).write_bytes((models["a1"] / name).read_bytes())
    first = js("register", str(folder1), "--name", "support-lora")
    assert first["ref"] == "support-lora@1" and first["filled"] is True and first["weights"] == "present"


def _repo_files(env, models, prov: dict) -> dict[str, bytes]:
    card = b"---\nlibrary_name: peft\ntags: [adapterhub-local]\n---\n"
    return {"README.md": card, "adapterhub.json": json.dumps(prov).encode(),
            "adapter_config.json": (models["a1"] / "adapter_config.json").read_bytes(),
            "adapter_model.safetensors": (models["a1"] / "adapter_model.safetensors").read_bytes()}


def test_a_hostile_adapterhub_json_creates_no_record(env, models, tmp_path, monkeypatch, capsys):
    org = use_org(env, "sync-evil")
    good = f"{org}/good"
    ok("push", str(models["a1"]), good)
    prov = json.loads(env.files(good)["adapterhub.json"])
    assert prov["team"]["version"] == 1 and prov["files"]  # what the hostile copies start from
    lies = {
        "other-version": {**prov, "team": {**prov["team"], "version": 5}},
        "no-hashes": {**prov, "files": {}},
        "merged": {**prov, "kind": "merged_model"},
        "bad-metric": {**prov, "metrics": {"eval_loss": "NaN!"}},
    }
    for name, body in lies.items():
        env.add_tag(f"{org}/{name}", "v1", env.add_repo(f"{org}/{name}", _repo_files(env, models, body), owner=org))
    machine(monkeypatch, tmp_path, "B")
    # other-version's head is tagged v1 but claims v5: sync does not "repair" it into a v5,
    # neither with a token that may not write here (BOB) nor with the owner's (test below)
    monkeypatch.setenv("HF_TOKEN", BOB)
    res = js("sync", org)
    assert [r["repo"] for r in res["recorded"]] == [good], res
    problems = " | ".join(res["problems"])
    assert f"{org}/other-version@v1: its adapterhub.json claims version v5" in problems
    assert f"{org}/no-hashes@v1: adapterhub.json lists no sha256 for adapter_config.json" in problems
    assert f"{org}/merged@v1: a merged model" in problems
    assert f"{org}/other-version: head claims v5, which no unfinished push leaves (latest v1); not tagged" in problems
    assert f"{org}/bad-metric" in problems and len(res["problems"]) == 5
    assert [r["ref"] for r in js("list")] == ["good@1"]
    # the CLI names them on stderr, and --weights refuses the same ones
    text = ok("sync", org)
    assert "4 versions on the Hub, 3 not in this registry" in text  # the refused ones stay missing
    # --weights refuses the same ones, but for no-hashes: a pull checks the weights against the
    # Hub's own hashes as it downloads them, so the record's later check is not needed
    res = js("sync", org, "--weights")
    assert [p["ref"] for p in res["pulled"]] == ["good@1", "no-hashes@1"] and len(res["problems"]) == 4
    assert sorted(r["ref"] for r in js("list")) == ["good@1", "no-hashes@1"]


def test_sync_with_a_writing_token_tags_only_what_a_dying_push_leaves(env, models, tmp_path, monkeypatch):
    """repair_head tags an untagged head only when it claims exactly the next version; a tagged
    head claiming another number, or an untagged one jumping ahead, is never tagged."""
    org = use_org(env, "sync-repair")
    ok("push", str(models["a1"]), f"{org}/good")
    prov = json.loads(env.files(f"{org}/good")["adapterhub.json"])

    def claim(n: int) -> dict[str, bytes]:
        return _repo_files(env, models, {**prov, "team": {**prov["team"], "version": n}})

    tagged = env.add_repo(f"{org}/tagged-claims-v5", claim(5), owner=org)
    env.add_tag(f"{org}/tagged-claims-v5", "v1", tagged)
    env.add_tag(f"{org}/jump", "v1", env.add_repo(f"{org}/jump", claim(1), owner=org))
    env.add_repo(f"{org}/jump", {**claim(9), "README.md": b"---\ntags: [adapterhub-local]\n---\nv9?\n"}, owner=org)
    env.add_tag(f"{org}/died", "v1", env.add_repo(f"{org}/died", claim(1), owner=org))
    died = env.add_repo(f"{org}/died", {**claim(2), "README.md": b"---\ntags: [adapterhub-local]\n---\nv2\n"},
                        owner=org)
    machine(monkeypatch, tmp_path, "B")
    monkeypatch.setenv("HF_TOKEN", ALICE)  # may write to every repo of the namespace
    res = js("sync", org)
    assert res["repaired"] == [f"{org}/died@v2"], res
    assert env.tags(f"{org}/died")["v2"] == died
    assert set(env.tags(f"{org}/tagged-claims-v5")) == {"v1"} and set(env.tags(f"{org}/jump")) == {"v1"}
    problems = " | ".join(res["problems"])
    assert f"{org}/tagged-claims-v5: head claims v5, which no unfinished push leaves (latest v1)" in problems
    assert f"{org}/jump: head claims v9, which no unfinished push leaves (latest v1)" in problems
    # and a push to the jumping repo is v2, not v10: versions come from the tags
    assert js("push", str(models["a2"]), f"{org}/jump")["version"] == 2


def test_pull_refuses_weights_that_do_not_match_the_recorded_metadata(env, models, pushed, tmp_path, monkeypatch,
                                                                     capsys):
    org, repo = pushed["org"], pushed["repo"]
    machine(monkeypatch, tmp_path, "B")
    js("sync", org)
    before = js("list")
    # the server rewrites what v2's commit holds (other weights, an adapterhub.json listing them)
    st = env.state
    with st.lock:
        commit = st.repos[repo].commits[pushed["c2"]]
        prov = json.loads(st.read(commit.files["adapterhub.json"].sha256))
        other = (models["a3"] / "adapter_model.safetensors").read_bytes()
        prov["files"]["adapter_model.safetensors"] = hashlib.sha256(other).hexdigest()
        body = json.dumps(prov).encode()
        commit.files["adapter_model.safetensors"] = st.entry("adapter_model.safetensors", st.store(other),
                                                             len(other), True)
        st.repos[repo].lfs.add(commit.files["adapter_model.safetensors"].sha256)
        commit.files["adapterhub.json"] = st.entry("adapterhub.json", st.store(body), len(body), False)
    line = fails(capsys, "pull", f"{repo}@v2")
    assert "the files downloaded are not the ones recorded for support-lora@2" in line
    assert js("list") == before  # nothing changed
    # a version tag moved to another commit: refused too
    env.add_tag(repo, "v1", pushed["c2"])
    line = fails(capsys, "pull", f"{repo}@v1")
    assert f"is commit {pushed['c2'][:12]} on the Hub now, but support-lora@1 was recorded" in line
    assert js("list") == before


def test_pull_force_onto_a_metadata_only_version_says_what_to_do(env, models, pushed, tmp_path, monkeypatch,
                                                                  capsys):
    """`pull --base OTHER --force` of a version sync recorded for another base cannot fill that
    record (its base is what the team recorded): one line saying so and how to register the
    weights apart, not a hint to use the --force that was given."""
    from tiny import make_llama

    org, repo = pushed["org"], pushed["repo"]
    other = make_llama(tmp_path / "other-base", seed=9)
    machine(monkeypatch, tmp_path, "B")
    js("sync", org)
    before = js("list")
    line = fails(capsys, "pull", f"{repo}@v1", "--base", str(other), "--force")
    assert "support-lora@1 recorded" in line and "--name" in line and "--force" not in line, line
    assert js("list") == before
    apart = js("pull", f"{repo}@v1", "--base", str(other), "--force", "--name", "support-other")
    assert apart["ref"] == "support-other@1" and apart["base_fingerprint"] != before[0]["base_fingerprint"]


def test_register_onto_a_metadata_only_version_of_another_base_says_what_to_do(env, models, pushed, tmp_path,
                                                                                monkeypatch, capsys):
    """register has no --force: the refusal to fill a record recorded for another base names the
    way out (another name), not a --force register does not have."""
    from tiny import make_llama

    other = make_llama(tmp_path / "other-base", seed=9)
    machine(monkeypatch, tmp_path, "B")
    js("sync", pushed["org"])
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_bytes((models["a1"] / name).read_bytes())
    line = fails(capsys, "register", str(folder), "--name", "support-lora", "--base", str(other))
    assert "fingerprint mismatch" in line and "--force" not in line and "another name" in line, line
    assert js("show", "support-lora@1")["weights"] == "metadata"


def test_concurrent_syncs_into_one_registry_record_each_version_once(env, pushed, tmp_path):
    """Three processes sync the same namespace into one fresh registry at once: each version is
    one record (the origin is checked inside the write transaction), one alias."""
    home = tmp_path / "shared"
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    e.update(HF_ENDPOINT=env.url, HF_TOKEN=ALICE, HF_HUB_DISABLE_XET="1", ADAPTERS_PROGRESS="0",
             HF_HOME=str(tmp_path / "hf"), ADAPTERS_HOME=str(home))
    code = "from adapterhub_local.cli import main; main()"
    procs = [subprocess.Popen([sys.executable, "-c", code, "sync", pushed["org"], "--json"], env=e,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1] for o in outs]
    made = [r["ref"] for o in outs for r in json.loads(o[0])["recorded"] if r["is_new"]]
    assert sorted(made) == ["support-lora@1", "support-lora@2"]  # each made by exactly one process
    con = sqlite3.connect(home / "registry.db")
    assert con.execute("SELECT name, version, weights FROM versions ORDER BY version").fetchall() == [
        ("support-lora", 1, "metadata"), ("support-lora", 2, "metadata")]
    assert con.execute("SELECT count(*) FROM hub").fetchone()[0] == 2
    assert con.execute("SELECT alias, source FROM aliases").fetchall() == [("prod", pushed["repo"])]
    con.close()


# -- the schema step ------------------------------------------------------------------------

def _downgrade_to_m003(db: Path) -> None:
    """What a registry written before m004 looks like: no weights column, no alias source."""
    con = sqlite3.connect(db)
    con.executescript("DROP INDEX versions_metadata_only; ALTER TABLE versions DROP COLUMN weights; "
                      "ALTER TABLE aliases DROP COLUMN source; "
                      "DELETE FROM _sqlite_migrations WHERE name = 'm004_metadata_only_versions';")
    con.commit()
    con.close()


def test_m004_upgrades_an_existing_registry_under_concurrent_opens(models, tmp_path):
    home = tmp_path / "old"
    env = {**os.environ, "ADAPTERS_HOME": str(home), "ADAPTERS_PROGRESS": "0"}
    cli = [sys.executable, "-c", "from adapterhub_local.cli import main; main()"]

    def run(*args):
        return subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=120)

    assert run("register", str(models["a1"]), "--name", "old", "--alias", "prod").returncode == 0
    assert run("register", str(models["a2"]), "--name", "old").returncode == 0
    _downgrade_to_m003(home / "registry.db")
    con = sqlite3.connect(home / "registry.db")
    assert "weights" not in [r[1] for r in con.execute("PRAGMA table_info(versions)")]
    con.close()

    procs = [subprocess.Popen([*cli, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in (["list", "--json"], ["list", "--json"], ["show", "old:prod", "--json"],
                          ["register", str(models["a3"]), "--name", "old"], ["verify", "--json"])]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 5, [o[1] for o in outs]
    con = sqlite3.connect(home / "registry.db")
    assert [r[0] for r in con.execute("SELECT name FROM _sqlite_migrations WHERE name LIKE 'm004%'")] == [
        "m004_metadata_only_versions"]
    assert con.execute("SELECT version, weights FROM versions ORDER BY version").fetchall() == [
        (1, "present"), (2, "present"), (3, "present")]
    assert con.execute("SELECT alias, source FROM aliases").fetchall() == [("prod", None)]
    with pytest.raises(sqlite3.IntegrityError):  # the column only takes the two states
        con.execute("UPDATE versions SET weights = 'half' WHERE version = 1")
    con.close()
    out = tmp_path / "exported"
    assert run("export", "old@1", str(out)).returncode == 0
    assert (out / "adapter_model.safetensors").read_bytes() == (models["a1"] / "adapter_model.safetensors").read_bytes()


def test_a_foreign_database_is_still_left_alone(tmp_path):
    """m004 runs after schema.check_ours: another application's db with a versions table is
    refused as before, byte for byte untouched."""
    home = tmp_path / "foreign"
    home.mkdir()
    db = home / "registry.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE versions (id INTEGER PRIMARY KEY, name TEXT)")
    con.commit()
    con.close()
    before = db.read_bytes()
    from adapterhub_local.registry import open_registry

    from adapterhub_local.errors import RegistryError

    with pytest.raises(RegistryError, match="not an adapterhub-local registry"):
        open_registry(home)
    assert db.read_bytes() == before


def test_a_metadata_only_record_keeps_no_name_with_a_trailing_newline(env, models, tmp_path, monkeypatch):
    """What sync keeps of a Hub's strings (targets, base model) is checked whole: a trailing
    newline ("$" matches before it) is refused like any other odd character."""
    org = use_org(env, "sync-newline")
    ok("push", str(models["a1"]), f"{org}/good")
    prov = json.loads(env.files(f"{org}/good")["adapterhub.json"])
    body = {**prov, "adapter": {**prov["adapter"], "targets": ["q_proj\n", "v_proj"]},
            "base": {**prov["base"], "name_or_path": "acme/base\n"}}
    env.add_tag(f"{org}/nl", "v1", env.add_repo(f"{org}/nl", _repo_files(env, models, body), owner=org))
    machine(monkeypatch, tmp_path, "B")
    assert [r["ref"] for r in js("sync", org)["recorded"]] == ["good@1", "nl@1"]
    shown = js("show", "nl@1")
    assert shown["targets"] == ["v_proj"] and shown["base_model"] is None
