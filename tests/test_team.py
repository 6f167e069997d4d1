"""The team registry on a Hub namespace (issue 15): race-free versions vN, aliases as tags,
metrics that travel both ways, remote list, sync; two registry homes stand in for two
machines. Driven through the real CLI and huggingface_hub against tests/hubserver.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hubserver import HubServer
from test_hub import ALICE, BOB, fails, ok, point_at
from tiny import make_llama, make_peft_adapter

ORG = "team"
REPO = f"{ORG}/support-lora"


@pytest.fixture(scope="module")
def hub():
    with HubServer(users={ALICE: "alice", BOB: "bob"}, orgs={"alice": [ORG], "bob": [ORG]}) as server:
        yield server


def variant(src: Path, out: Path, seed: int) -> Path:
    """The adapter at ``src`` with other weights (same shapes): a distinct version, cheaply."""
    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    shutil.copy(src / "adapter_config.json", out / "adapter_config.json")
    g = torch.Generator().manual_seed(seed)
    src_tensors = load_file(src / "adapter_model.safetensors")
    tensors = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in src_tensors.items()}
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("teammodels")
    base = make_llama(root / "base")
    first = make_peft_adapter(base, root / "a1", seed=3)
    return {"base": base, "a1": first, "a2": variant(first, root / "a2", 4), "a3": variant(first, root / "a3", 5),
            "root": root}


@pytest.fixture
def env(hub, monkeypatch, tmp_path):
    point_at(hub, monkeypatch, tmp_path)
    hub.state.commit_delay = 0.0
    hub.state.hostile = {}
    return hub


def machine(monkeypatch, tmp_path, name: str) -> Path:
    """Switch to another registry home: another machine."""
    home = tmp_path / f"machine-{name}"
    monkeypatch.setenv("ADAPTERS_HOME", str(home))
    return home


def js(*args):
    return json.loads(ok(*args, "--json"))


def test_two_machines_push_alias_list_pull(env, models, tmp_path, monkeypatch):
    repo = f"{ORG}/two-machines"
    machine(monkeypatch, tmp_path, "A")
    ok("register", str(models["a1"]), "--name", "support", "--base", str(models["base"]), "--metric", "eval_loss=1.5")
    ok("register", str(models["a2"]), "--name", "support", "--base", str(models["base"]), "--metric", "eval_loss=1.2")
    fp = js("show", "support@1")["base_fingerprint"]

    p1 = js("push", "support@1", repo)
    p2 = js("push", "support@2", repo)
    assert (p1["version"], p2["version"]) == (1, 2) and not p1["unchanged"]
    assert env.tags(repo) == {"v1": p1["commit_id"], "v2": p2["commit_id"]}
    again = js("push", "support@2", repo)  # already there: no new version
    assert again["unchanged"] and again["version"] == 2
    assert env.tags(repo) == {"v1": p1["commit_id"], "v2": p2["commit_id"]}
    out = ok("push", "support@1", repo)  # content of v1 again, but head is v2: a new version, v3
    assert "as v3" in out
    assert js("show", "support@2")["hub"][0]["revision"] == "v2"

    assert "team/two-machines:prod -> v2" in ok("remote", "alias", repo, "prod", "v2")
    assert "(was v2)" in ok("remote", "alias", repo, "prod", "v1")  # moved
    ok("remote", "alias", repo, "staging", "v3")
    assert env.tags(repo)["prod"] == p1["commit_id"]

    # machine B: nothing local; the Hub is the shared registry
    machine(monkeypatch, tmp_path, "B")
    rows = [r for r in js("remote", "list", ORG) if r["repo"] == repo]
    assert [(r["version"], r["aliases"]) for r in rows] == [(1, ["prod"]), (2, []), (3, ["staging"])]
    assert all(r["base_fingerprint"] == fp for r in rows)
    assert [r["metrics"] for r in rows] == [{"eval_loss": 1.5}, {"eval_loss": 1.2}, {"eval_loss": 1.5}]
    table = ok("remote", "list", ORG, "--where", "eval_loss<1.4")
    assert "v2" in table and "v1" not in table and "two-machines" in table
    assert [r["version"] for r in js("remote", "list", ORG, "--sort", "-eval_loss", "--base", fp[:20])
            if r["repo"] == repo] == [1, 3, 2]

    pulled = js("pull", f"{repo}:prod")
    assert pulled["hub_version"] == "v1" and pulled["alias"] == "prod" and pulled["is_new"]
    assert pulled["commit_id"] == p1["commit_id"] and pulled["claimed_metrics"] == {"eval_loss": 1.5}
    assert not js("pull", f"{repo}@v1")["is_new"]  # the same version again: a no-op
    shown = js("show", pulled["ref"])
    assert shown["origin"]["repo_id"] == repo and shown["origin"]["version"] == "v1"
    assert shown["origin"]["commit_id"] == p1["commit_id"] and len(shown["hub"]) == 1
    assert shown["hub"][0]["revision"] == "v1"  # the version, never the alias
    text = ok("show", pulled["ref"])
    assert f"{repo}@v1 (commit {p1['commit_id']}" in text and f"claimed by {repo}@v1" in text
    assert shown["metrics"] == {} and shown["claims"] == {"eval_loss": 1.5}
    # plain ORG/NAME is main's head, which is v3 (v1's bytes again): recorded as v3 on the same version
    head = js("pull", repo)
    assert head["hub_version"] == "v3" and head["revision"] == "v3" and head["ref"] == pulled["ref"]
    assert [h["revision"] for h in js("show", pulled["ref"])["hub"]] == ["v1", "v3"]


def test_claims_never_rank_with_local_measurements_unless_asked(env, models, tmp_path, monkeypatch):
    repo = f"{ORG}/boastful"
    machine(monkeypatch, tmp_path, "A")
    ok("register", str(models["a3"]), "--name", "boast", "--metric", "acc=0.99")
    ok("push", "boast", repo)
    machine(monkeypatch, tmp_path, "B")
    ok("register", str(models["a1"]), "--name", "mine", "--metric", "acc=0.5")
    ok("pull", repo)
    assert [r["name"] for r in js("list", "--sort", "-acc")] == ["mine"]  # a claim is no measurement
    assert js("list", "--where", "acc>0.9") == []
    table = ok("list")
    assert "0.99*" in table
    assert [r["name"] for r in js("list", "--sort", "-acc", "--claims")] == ["boastful", "mine"]
    assert [r["name"] for r in js("list", "--where", "acc>0.9", "--claims")] == ["boastful"]


def test_metrics_travel_both_ways(env, models, tmp_path, monkeypatch):
    repo = f"{ORG}/metrics"
    machine(monkeypatch, tmp_path, "A")
    ok("register", str(models["a1"]), "--name", "m")
    v1 = js("push", "m", repo)
    tags = env.tags(repo)
    out = js("log-metric", "m@1", "win_rate=0.62", "--push")
    assert out["pushed"][0]["version"] == "v1" and not out["pushed"][0]["unchanged"]
    assert env.tags(repo) == tags and env.head(repo) != v1["commit_id"]  # a commit, not a version
    assert js("log-metric", "m@1", "win_rate=0.62", "--push")["pushed"][0]["unchanged"]
    again = js("push", "m", repo)  # the head is a metrics-only commit over v1's files: still v1
    assert again["unchanged"] and again["version"] == 1 and env.tags(repo) == tags

    machine(monkeypatch, tmp_path, "B")
    assert [r["metrics"] for r in js("remote", "list", ORG) if r["repo"] == repo] == [{"win_rate": 0.62}]
    pulled = js("pull", f"{repo}@v1")
    assert pulled["claimed_metrics"] == {"win_rate": 0.62}
    # B measures too and pushes its number back to the same version; A sees it
    js("log-metric", pulled["ref"], "loss=2.0", "--split", "eval", "--push")
    machine(monkeypatch, tmp_path, "A")
    ok("register", str(models["a2"]), "--name", "m")
    v2 = js("push", "m@2", repo)  # a new version carries the logged metrics forward
    assert v2["version"] == 2
    rows = {r["version"]: r["metrics"] for r in js("remote", "list", ORG) if r["repo"] == repo}
    assert rows == {1: {"win_rate": 0.62, "eval_loss": 2.0}, 2: {}}

    ok("register", str(models["a3"]), "--name", "never-pushed")
    assert "never pushed" in fails_cli(["log-metric", "never-pushed", "x=1", "--push"])
    assert js("show", "never-pushed")["metrics"] == {"x": 1.0}  # recorded locally all the same


def fails_cli(args):
    """One error line (through main) or None when the command succeeded."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from adapterhub_local.cli import main

    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        try:
            main(args)
        except SystemExit as e:
            if e.code:
                lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
                assert len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()
                return lines[0]
    return None


def test_alias_rules(env, models, tmp_path, monkeypatch, capsys):
    repo = f"{ORG}/aliases"
    ok("push", str(models["a1"]), repo)
    assert "reserved" in fails(capsys, "remote", "alias", repo, "v7", "v1")
    assert "no version v9" in fails(capsys, "remote", "alias", repo, "prod", "v9")
    assert "bad version" in fails(capsys, "remote", "alias", repo, "prod", "1")
    assert "no alias 'prod'" in fails(capsys, "remote", "alias", repo, "prod", "--rm")
    ok("remote", "alias", repo, "prod", "v1")
    assert "removed team/aliases:prod (was v1)" in ok("remote", "alias", repo, "prod", "--rm")
    assert "prod" not in env.tags(repo)
    assert "no alias 'prod'" in fails(capsys, "pull", f"{repo}:prod")
    env.add_tag(repo, "loose", env.commit_chain(repo)[-1])  # an alias on a commit that is no version
    assert "has no version tag" in fails(capsys, "pull", f"{repo}:loose")
    monkeypatch.setenv("HF_TOKEN", "tok-nobody")
    assert "401" in fails(capsys, "remote", "alias", repo, "prod", "v1")


def test_a_crashed_push_is_repaired_by_the_next_push_and_by_sync(env, models, tmp_path, monkeypatch):
    repo = f"{ORG}/crash"
    ok("push", str(models["a1"]), repo)
    v2 = js("push", str(models["a2"]), repo)
    with env.state.lock:  # the push died between its commit and its tag
        del env.state.repos[repo].tags["v2"]
    out = js("push", str(models["a3"]), repo)
    assert out["attempts"]["repaired"] == [2] and out["version"] == 3
    assert env.tags(repo) == {"v1": env.commit_chain(repo)[2], "v2": v2["commit_id"], "v3": out["commit_id"]}

    with env.state.lock:
        del env.state.repos[repo].tags["v3"]
    res = js("sync", ORG)
    assert f"{repo}@v3" in res["repaired"] and env.tags(repo)["v3"] == out["commit_id"]
    assert f"{repo}@v3" in res["missing"]


def test_a_version_tag_taken_by_someone_else_makes_the_push_the_next_version(env, models):
    """Someone tags v2 by hand between our commit and our tag: create_tag answers 409; the push
    commits again as v3 (its commit claiming v2 stays untagged) and says so."""
    repo = f"{ORG}/stolen"
    ok("push", str(models["a1"]), repo)
    first = env.head(repo)

    def steal(r, commit):
        if r.id == repo and "v2" not in r.tags:
            r.tags["v2"] = first  # the tag our push is about to create, on another commit

    env.state.on_commit = steal
    try:
        out = js("push", str(models["a2"]), repo)
    finally:
        env.state.on_commit = None
    assert out["version"] == 3 and out["attempts"]["tag_taken"] == 1 and out["attempts"]["attempts"] == 2
    tags = env.tags(repo)
    assert tags["v2"] == first and tags["v3"] == out["commit_id"] == env.head(repo)
    files = env.files(repo, out["commit_id"])
    assert files["adapter_model.safetensors"] == (models["a2"] / "adapter_model.safetensors").read_bytes()
    assert json.loads(files["adapterhub.json"])["team"]["version"] == 3


def test_sync_pulls_versions_and_aliases_and_names_what_is_not_on_the_hub(env, models, tmp_path, monkeypatch):
    org = "syncorg"
    env.state.orgs["alice"] = [ORG, org]
    repo = f"{org}/s"
    machine(monkeypatch, tmp_path, "A")
    ok("register", str(models["a1"]), "--name", "s")
    ok("register", str(models["a2"]), "--name", "s")
    ok("push", "s@1", repo)
    ok("push", "s@2", repo)
    ok("remote", "alias", repo, "prod", "v1")
    assert js("sync", org)["missing"] == []  # A has both: pushed from here

    machine(monkeypatch, tmp_path, "B")
    ok("register", str(models["a3"]), "--name", "local-only")
    res = js("sync", org)
    assert res["missing"] == [f"{repo}@v1", f"{repo}@v2"] and res["pulled"] == []
    # metadata-only records (tests/test_team_sync.py) take the team's aliases at once
    assert res["aliases_set"] == ["s:prod -> s@1"] and res["metadata_only"] == ["s@1", "s@2"]
    assert res["not_on_hub"] == ["local-only@1"]
    res = js("sync", org, "--weights")
    assert [p["tag"] for p in res["pulled"]] == ["v1", "v2"] and res["aliases_set"] == []
    assert all(p["filled"] for p in res["pulled"]) and res["metadata_only"] == []
    assert js("show", "s:prod")["origin"]["version"] == "v1"
    again = js("sync", org, "--weights")
    assert again["missing"] == [] and again["pulled"] == [] and again["aliases_set"] == []


def test_remote_list_calls_and_cache(env, models, tmp_path):
    """A namespace of 100 adapters: what `remote list` costs, first and second time."""
    org = "hundred"
    prov = json.loads(json.dumps({"format": "adapterhub-local/provenance", "format_version": 2,
                                  "base": {"fingerprint": "sha256:" + "ab" * 32}, "metrics": {"acc": 0.5}}))
    card = b"---\nlibrary_name: peft\ntags: [peft, lora, adapterhub-local]\n---\n# x\n"
    for i in range(100):
        prov["team"] = {"repo_id": f"{org}/a{i:03d}", "version": 1}
        prov["metrics"] = {"acc": i / 100}
        commit = env.add_repo(f"{org}/a{i:03d}", {"README.md": card, "adapterhub.json": json.dumps(prov).encode()},
                              owner=org)
        env.add_tag(f"{org}/a{i:03d}", "v1", commit)
    env.add_repo(f"{org}/plain-peft", {"README.md": b"---\nlibrary_name: peft\n---\n"}, owner=org)
    # huggingface_hub fetches {ENDPOINT}/api/agent-harnesses once a day when it finds an AI agent's
    # environment variables (utils/_detect_agent.py): not ours, and not there on a person's machine
    hub_calls = lambda: [r for r in env.requests if r[1] != "/api/agent-harnesses"]  # noqa: E731
    env.clear_requests()
    rows = js("remote", "list", org, "--sort", "-acc")
    first = hub_calls()
    assert len(rows) == 100 and rows[0]["repo"] == f"{org}/a099" and rows[0]["metrics"] == {"acc": 0.99}
    assert all(r["repo"] != f"{org}/plain-peft" for r in rows)
    env.clear_requests()
    assert js("remote", "list", org, "--sort", "-acc") == rows
    second = hub_calls()
    env.clear_requests()
    assert js("remote", "list", org, "--sort", "-acc", "--refresh") == rows
    refreshed = hub_calls()
    count = lambda reqs, s: sum(1 for _, p in reqs if s in p)  # noqa: E731
    # first: 1 listing + 100 refs + 100 adapterhub.json (each head is its v1 commit: one file each)
    assert (len(first), count(first, "/refs"), count(first, "/resolve/")) == (201, 100, 100)
    # second, nothing changed: the listing alone (refs cached by head commit, files by commit)
    assert second == [("GET", "/api/models")]
    # --refresh: the listing and the refs; every adapterhub.json comes from the cache
    assert (len(refreshed), count(refreshed, "/resolve/")) == (101, 0)
    print(f"\nremote list of 100 adapters: {len(first)} requests, then {len(second)}, "
          f"{len(refreshed)} with --refresh")


PUSHER = r"""
import json, os, sys
from adapterhub_local.cli import main
sys.argv = ["adapters", "push", sys.argv[1], sys.argv[2], "--json"]
main()
"""


def test_concurrent_pushes_get_distinct_gap_free_versions(env, models, tmp_path):
    """N processes push N different adapters to one repo at the same moment; the server holds
    every commit 0.3 s so they overlap. Each must end as its own version, v1..vN."""
    n = 5
    repo = f"{ORG}/race"
    dirs = [variant(models["a1"], tmp_path / f"p{i}", 100 + i) for i in range(n)]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    base_env.update(HF_ENDPOINT=env.url, HF_TOKEN=ALICE, HF_HUB_DISABLE_XET="1", ADAPTERS_PROGRESS="0",
                    HF_HOME=str(tmp_path / "hf"))
    ok("push", str(models["a1"]), repo)  # the repo exists: the race is on versions, not creation
    env.state.commit_delay = 0.3
    procs = []
    for i, d in enumerate(dirs):
        e = dict(base_env, ADAPTERS_HOME=str(tmp_path / f"home{i}"))
        procs.append(subprocess.Popen([sys.executable, "-c", PUSHER, str(d), repo], env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    env.state.commit_delay = 0.0

    tags = env.tags(repo)
    versions = sorted(r["version"] for r in results)
    assert versions == list(range(2, n + 2))  # gap-free, no two the same
    assert {f"v{k}" for k in range(1, n + 2)} == set(tags)
    assert len(set(tags.values())) == n + 1  # distinct commits
    chain = env.commit_chain(repo)
    for r, d in zip(results, dirs):
        commit = tags[f"v{r['version']}"]
        assert commit == r["commit_id"] and commit in chain
        files = env.files(repo, commit)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            assert files[name] == (d / name).read_bytes()  # exactly this push's bytes
        assert json.loads(files["adapterhub.json"])["team"]["version"] == r["version"]
    stale = sum(r["attempts"]["stale_parent"] for r in results)
    taken = sum(r["attempts"]["tag_taken"] for r in results)
    assert stale >= 1  # they really overlapped: someone's commit was refused on a stale head
    print(f"\n{n} processes -> v2..v{n + 1}; 412 retries {stale}, 409 {taken}, "
          f"attempts {[r['attempts']['attempts'] for r in results]}")


def test_the_test_hub_speaks_what_huggingface_hub_sends(env, models):
    """The server's tag, refs and listing answers as huggingface_hub 2.x parses them."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    repo = f"{ORG}/api"
    ok("push", str(models["a1"]), repo)
    api = HfApi(endpoint=env.url, token=ALICE)
    head = env.head(repo)
    with pytest.raises(HfHubHTTPError) as e:
        api.create_tag(repo, tag="v1", revision=head)  # exists: 409, never silently accepted
    assert e.value.response.status_code == 409
    api.create_tag(repo, tag="extra", revision=head)
    refs = api.list_repo_refs(repo)
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": head, "extra": head}
    assert api.model_info(repo, revision="extra").sha == head  # downloads resolve at a tag
    api.delete_tag(repo, tag="extra")
    with pytest.raises(HfHubHTTPError) as e:
        api.delete_tag(repo, tag="extra")
    assert e.value.response.status_code == 404
    found = list(api.list_models(author=ORG, filter="adapterhub-local", cardData=True, full=True))
    mine = [m for m in found if m.id == repo]
    assert mine and "adapterhub-local" in mine[0].card_data.tags and mine[0].sha == head
    # as on the Hub: the head commit only when asked for (full, or expand=["sha"] and nothing else)
    assert [m.sha for m in api.list_models(author=ORG, filter="adapterhub-local", cardData=True)
            if m.id == repo] == [None]
    only = [m for m in api.list_models(author=ORG, filter="adapterhub-local", expand=["sha"]) if m.id == repo]
    assert [(m.sha, m.tags, m.created_at) for m in only] == [(head, None, None)]
    assert not list(api.list_models(author="nobody", filter="adapterhub-local"))
    from huggingface_hub import CommitOperationAdd

    stale = env.commit_chain(repo)[1]
    with pytest.raises(HfHubHTTPError) as e:
        api.create_commit(repo, [CommitOperationAdd("x.txt", b"x")], commit_message="x", parent_commit=stale)
    assert e.value.response.status_code == 412 and env.head(repo) == head
