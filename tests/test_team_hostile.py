# ruff: noqa: F811  (env and models are pytest fixtures imported from test_team)
"""Nothing from a Hub is trusted (issue 12, item 4), against the test Hub's hostile mode:
lying commit ids, file names, hashes and sizes, hostile adapterhub.json and tag names,
stalls, cross-host redirects, a huge listing. Each ends in one error line (or a repo
skipped by `remote list`, named on stderr) and nothing registered."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from hubserver import HubServer
from test_hub import ALICE, fails, ok
from test_team import env, models  # noqa: F401  (fixtures)

from adapterhub_local.cli import cli

ORG = "team"


@pytest.fixture(scope="module")
def hub():
    with HubServer(users={ALICE: "alice"}, orgs={"alice": [ORG]}) as server:
        yield server


@pytest.fixture
def published(env, models):  # noqa: F811
    """team/good: one version pushed the normal way; returns (repo_id, commit)."""
    repo = f"{ORG}/good"
    if repo not in env.state.repos:
        ok("push", str(models["a1"]), repo)
    return repo, env.tags(repo)["v1"]


def nothing_registered():
    assert json.loads(ok("list", "--json")) == []


def remote_list(org=ORG):
    res = CliRunner().invoke(cli, ["remote", "list", org, "--json"], catch_exceptions=False)
    return res


@pytest.mark.parametrize("cid", ["../../../../tmp/x", "A" * 40, "0" * 39, "0" * 39 + "g", "main"])
def test_commit_ids_from_the_server_are_checked(env, published, capsys, cid):
    repo, _ = published
    env.state.hostile = {"commit_id": cid}
    assert "answered with an invalid commit id" in fails(capsys, "pull", repo)
    nothing_registered()
    assert "answered with an invalid head commit" in fails(capsys, "pull", f"{repo}@v1")
    res = remote_list()
    assert res.exit_code == 0 and json.loads(res.stdout) == []
    assert f"skipped {repo}:" in res.stderr and "invalid" in res.stderr


@pytest.mark.parametrize("name", ["../../evil", "/etc/passwd", "a/../../b", "..\\..\\x", "C:/x", "a//b",
                                  "x\x1b[2Jy", ""])
def test_hostile_file_names_refuse_the_repo(env, published, capsys, name):
    repo, _ = published
    env.state.hostile = {"names": [name]}
    line = fails(capsys, "pull", repo)
    assert "not a safe relative path" in line and "\x1b" not in line
    nothing_registered()


def test_lying_hashes_and_sizes(env, published, capsys):
    repo, _ = published
    real = len(env.files(repo)["adapter_model.safetensors"])
    env.state.hostile = {"sha256": {"adapter_model.safetensors": "0" * 64}}
    assert "sha256" in fails(capsys, "pull", repo)
    env.state.hostile = {"sizes": {"adapter_model.safetensors": real + 1}}
    line = fails(capsys, "pull", repo)
    assert f"Hub lists {real + 1:,}" in line or "size" in line
    nothing_registered()
    # an announced size past the bound is refused before anything is downloaded
    env.clear_requests()
    env.state.hostile = {"sizes": {"adapter_model.safetensors": 1 << 50}}
    assert "adapter_model.safetensors: larger than 64 GiB" in fails(capsys, "pull", repo)
    assert not [p for _, p in env.requests if "/resolve/" in p]
    # bytes that are not what the listing says
    env.state.hostile = {"serve": {"adapter_model.safetensors": b"\0" * real}}
    line = fails(capsys, "pull", repo)
    assert "sha256" in line or "corrupt" in line
    nothing_registered()


BAD_PROVENANCE = {
    "nan metric": b'{"format": "adapterhub-local/provenance", "format_version": 2, "metrics": {"acc": NaN}}',
    "huge metric": b'{"format": "adapterhub-local/provenance", "format_version": 2, "metrics": {"acc": 1e999}}',
    "string version": b'{"format": "adapterhub-local/provenance", "format_version": 2, "team": {"version": "1"}}',
    "bad later metrics": b'{"format": "adapterhub-local/provenance", "format_version": 2, '
                         b'"team": {"metrics": {"prod": {"acc": 1}}}}',
    "bad fingerprint": b'{"format": "adapterhub-local/provenance", "format_version": 2, '
                       b'"base": {"fingerprint": "sha256:../../x"}}',
    "deep": b'{"format": "adapterhub-local/provenance", "format_version": 2, "x": ' + b"[" * 5000 + b"]" * 5000
            + b"}",
    "too big": b'{"format": "adapterhub-local/provenance", "format_version": 2, "pad": "' + b"x" * (5 << 20) + b'"}',
    "not ours": b'[1, 2, 3]',
    "file name": b'{"format": "adapterhub-local/provenance", "format_version": 2, "files": {"../x": "' + b"0" * 64
                 + b'"}}',
}


@pytest.mark.parametrize("kind", sorted(BAD_PROVENANCE))
def test_hostile_adapterhub_json(env, models, capsys, kind):  # noqa: F811
    org = "evil-" + kind.replace(" ", "-")
    env.state.orgs["alice"] = [ORG, org]
    card = b"---\nlibrary_name: peft\ntags: [adapterhub-local]\n---\n"
    files = {"README.md": card, "adapterhub.json": BAD_PROVENANCE[kind],
             "adapter_config.json": (models["a1"] / "adapter_config.json").read_bytes(),
             "adapter_model.safetensors": (models["a1"] / "adapter_model.safetensors").read_bytes()}
    commit = env.add_repo(f"{org}/bad", files, owner=org)
    env.add_tag(f"{org}/bad", "v1", commit)
    res = remote_list(org)
    assert res.exit_code == 0 and json.loads(res.stdout) == [], res.output
    assert f"skipped {org}/bad:" in res.stderr and "Traceback" not in res.stderr
    # pull: an adapterhub.json we cannot accept stops the pull, in one line, nothing registered
    line = fails(capsys, "pull", f"{org}/bad@v1")
    assert "adapterhub.json" in line and "\x1b" not in line
    assert json.loads(ok("list", "--json")) == []


def test_hostile_tags_are_ignored_or_refused(env, published):
    repo, commit = published
    env.state.hostile = {"tags": {"v2\x1b[31m": commit, "../prod": commit, "v02": commit}}
    rows = json.loads(remote_list().stdout)
    assert [(r["repo"], r["version"], r["aliases"]) for r in rows] == [(repo, 1, [])]
    env.state.hostile = {"tags": {"prod": "not-a-commit"}}
    res = remote_list()
    assert json.loads(res.stdout) == [] and "invalid commit" in res.stderr


def test_stall_ends_in_one_line(env, published, capsys, monkeypatch):
    repo, _ = published
    monkeypatch.setenv("ADAPTERS_HUB_TIMEOUT", "0.5")
    env.state.hostile = {"stall": ("/refs", 3)}
    line = fails(capsys, "pull", f"{repo}@v1")
    assert "cannot reach the Hub" in line and "reading tags" in line


def test_server_errors_are_one_line(env, published, capsys):
    repo, _ = published
    for status, words in ((500, "HTTP 500"), (503, "HTTP 503"), (429, "HTTP 429"), (401, "401")):
        env.state.hostile = {"fail": ("/refs", status)}
        assert words in fails(capsys, "remote", "alias", repo, "prod", "v1")
        assert words in fails(capsys, "pull", f"{repo}@v1")


def test_token_never_follows_a_redirect_to_another_host(env, published, capsys):
    repo, _ = published
    with HubServer() as other:
        env.state.hostile = {"redirect": other.url + "/elsewhere"}
        line = fails(capsys, "pull", repo)
        assert line.startswith("error: ")
        seen = other.state.auth_seen
        assert seen and all(auth is None for _, _, auth in seen)  # the request came, without the token
    assert all(auth == f"Bearer {ALICE}" for m, p, auth in env.state.auth_seen[-3:] if "/api/" in p)
    nothing_registered()


def test_a_huge_listing_is_refused(env, published, monkeypatch, capsys):
    from adapterhub_local.hub import remote

    monkeypatch.setattr(remote, "MAX_REPOS", 50)
    env.state.page_size = 20
    env.state.hostile = {"listing": 60}
    try:
        assert "more than 50 repos" in fails(capsys, "remote", "list", ORG)
    finally:
        env.state.page_size = 1000
    monkeypatch.setattr(remote, "MAX_TAGS", 3)
    env.state.hostile = {"tags": {f"t{i}": "0" * 40 for i in range(5)}}
    res = remote_list()
    assert "6 tags" in res.stderr and json.loads(res.stdout) == []


def test_a_download_cut_off_mid_file_registers_nothing(env, published, capsys):
    repo, _ = published
    env.state.hostile = {"truncate": {"adapter_model.safetensors": 100}}
    line = fails(capsys, "pull", f"{repo}@v1")
    assert "download" in line, line
    nothing_registered()
    env.state.hostile = {}
    assert json.loads(ok("pull", f"{repo}@v1", "--json"))["is_new"]  # run again: it finishes
