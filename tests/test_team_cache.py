# ruff: noqa: F811  (env and models are pytest fixtures imported from test_team)
"""`remote list` caches each repo's refs by its head commit (issue 15: "a second call costs one
listing"). Counted on the test Hub's side: the first call is 1 listing + 1 refs read per repo +
the adapterhub.json downloads; a second call on an unchanged namespace is exactly 1 request; a
push or an alias move re-reads exactly that repo; a tag not created yet (the moment between a
commit and its tag) is never cached; --refresh re-reads every repo; a cache file that is not
exactly what we write is ignored."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from hubserver import HubServer
from test_hub import ALICE, fails, ok
from test_team import env, models  # noqa: F401  (fixtures)

from adapterhub_local.cli import cli

ORG = "cache"


@pytest.fixture(scope="module")
def hub():
    with HubServer(users={ALICE: "alice"}, orgs={"alice": [ORG, "race"]}) as server:
        yield server


@pytest.fixture
def team(env, models):  # noqa: F811
    """cache/r0..r2, each with v1 (pushed the normal way: a real adapterhub.json and card)."""
    repos = [f"{ORG}/r{i}" for i in range(3)]
    for repo, src in zip(repos, ("a1", "a2", "a3")):
        if repo not in env.state.repos:
            ok("push", str(models[src]), repo)
    for repo in repos:  # earlier tests moved things: back to v1 only, no alias, head = v1's commit
        with env.state.lock:
            r = env.state.repos[repo]
            v1 = r.tags["v1"]
            r.tags.clear()
            r.tags["v1"] = v1
            r.branches["main"] = v1
    env.state.hostile = {}
    return repos


@pytest.fixture
def elsewhere(tmp_path):
    """Run a command on another machine (another registry home, its own caches)."""
    return lambda *args: ok("--registry", str(tmp_path / "other-machine"), *args)


def hub_calls(env) -> list[tuple[str, str]]:
    # huggingface_hub may fetch /api/agent-harnesses once a day (utils/_detect_agent.py): not ours
    return [r for r in env.requests if r[1] != "/api/agent-harnesses"]


def listing(env, *args) -> tuple[list[dict], list[tuple[str, str]], str]:
    """(rows, the requests the Hub saw, stderr) of one `remote list ORG --json --calls`."""
    env.clear_requests()
    res = CliRunner().invoke(cli, ["remote", "list", ORG, "--json", "--calls", *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.stderr
    return json.loads(res.stdout), hub_calls(env), res.stderr


def refs_read(calls) -> list[str]:
    """The repos whose refs were read, in order."""
    return [p.removeprefix("/api/models/").removesuffix("/refs") for _, p in calls if p.endswith("/refs")]


def downloads(calls) -> int:
    return sum(1 for _, p in calls if "/resolve/" in p)


def view(rows, repo=None) -> list[tuple]:
    return [(r["repo"], r["tag"], r["aliases"]) for r in rows if repo is None or r["repo"] == repo]


ONE_LISTING = [("GET", "/api/models")]


def test_second_call_is_one_request_and_changes_reread_only_their_repo(env, team, models, elsewhere):
    r0, r1, r2 = team
    rows, calls, err = listing(env)
    assert view(rows) == [(r0, "v1", []), (r1, "v1", []), (r2, "v1", [])]
    # first: 1 listing + 3 refs + 3 adapterhub.json (each head is its v1 commit)
    assert len(calls) == 7 and calls[0] == ("GET", "/api/models")
    assert refs_read(calls) == team and downloads(calls) == 3
    assert "7 Hub requests: 1 listing page, 3 refs reads, 3 downloads of adapterhub.json" in err
    again, calls, err = listing(env)
    assert calls == ONE_LISTING and again == rows  # nothing changed: the listing alone
    assert "1 Hub request: 1 listing page, 0 refs reads, 0 downloads of adapterhub.json" in err

    # an alias: committed (the head moves), so exactly that repo is read again and shows it
    elsewhere("remote", "alias", r1, "prod", "v1")
    rows, calls, _ = listing(env)
    assert view(rows, r1) == [(r1, "v1", ["prod"])]
    assert refs_read(calls) == [r1] and downloads(calls) == 1 and len(calls) == 3  # + the new head's file
    assert listing(env)[1] == ONE_LISTING

    # a new version of r2, then an alias moved from v1 to v2 there
    assert "as v2" in elsewhere("push", str(models["a1"]), r2)
    rows, calls, _ = listing(env)
    assert view(rows, r2) == [(r2, "v1", []), (r2, "v2", [])] and refs_read(calls) == [r2]
    assert downloads(calls) == 1 and len(calls) == 3  # v2's adapterhub.json (it is the head)
    assert listing(env)[1] == ONE_LISTING
    elsewhere("remote", "alias", r2, "prod", "v1")
    assert view(listing(env)[0], r2) == [(r2, "v1", ["prod"]), (r2, "v2", [])]
    assert "(was v1)" in elsewhere("remote", "alias", r2, "prod", "v2")
    rows, calls, _ = listing(env)
    assert view(rows, r2) == [(r2, "v1", []), (r2, "v2", ["prod"])] and refs_read(calls) == [r2]
    elsewhere("remote", "alias", r2, "prod", "--rm")
    rows, calls, _ = listing(env)
    assert view(rows, r2) == [(r2, "v1", []), (r2, "v2", [])] and refs_read(calls) == [r2]
    assert listing(env)[1] == ONE_LISTING

    # a push that carries the alias table keeps the repo cacheable; the alias stays where it was
    elsewhere("remote", "alias", r1, "staging", "v1")
    assert "as v2" in elsewhere("push", str(models["a3"]), r1)
    rows, calls, _ = listing(env)
    assert view(rows, r1) == [(r1, "v1", ["prod", "staging"]), (r1, "v2", [])] and refs_read(calls) == [r1]
    assert listing(env)[1] == ONE_LISTING

    # --refresh reads every repo's refs again (the files stay cached)
    rows2, calls, err = listing(env, "--refresh")
    assert rows2 == rows and refs_read(calls) == team and downloads(calls) == 0 and len(calls) == 4
    assert listing(env)[1] == ONE_LISTING


def test_alias_and_metrics_commits_are_no_new_version(env, team, models):
    r0 = team[0]
    tags = env.tags(r0)
    ok("remote", "alias", r0, "prod", "v1")
    head = env.head(r0)
    assert head != tags["v1"] and env.tags(r0) == {**tags, "prod": tags["v1"]}
    files = json.loads(env.files(r0)["adapterhub.json"])
    assert files["team"]["aliases"] == {"prod": "v1"} and files["team"]["version"] == 1
    again = json.loads(ok("push", str(models["a1"]), r0, "--json"))  # the same bytes: still v1
    assert again["unchanged"] and again["version"] == 1 and env.head(r0) == head
    assert "prod -> v1" in ok("remote", "alias", r0, "prod", "v1") and env.head(r0) == head  # no-op: no commit
    pulled = json.loads(ok("pull", r0, "--json"))  # the head (an alias commit over v1) is v1
    assert pulled["hub_version"] == "v1" and pulled["commit_id"] == tags["v1"]


def test_a_head_pulled_by_branch_is_vk_only_if_the_hub_lists_vks_files(env, models, capsys):
    """A head whose adapterhub.json claims vK with the files vK's adapterhub.json lists is vK only
    when the Hub's own file hashes at vK's commit are the head's: adapterhub.json at vK may lie
    about its own files (then `pull @vK` refuses them), and a pull of main must not record the
    head's bytes as vK's commit."""
    from test_hub import fails

    ok("push", str(models["a1"]), "race/liar-src")
    prov = env.files("race/liar-src")["adapterhub.json"]  # claims v1 with a1's hashes
    repo = "race/head-liar"
    card = b"---\nlibrary_name: peft\ntags: [adapterhub-local]\n---\n"
    v1 = env.add_repo(repo, {"README.md": card, "adapterhub.json": prov,
                             "adapter_config.json": (models["a1"] / "adapter_config.json").read_bytes(),
                             "adapter_model.safetensors": (models["a2"] / "adapter_model.safetensors").read_bytes()},
                      owner="race")
    env.add_tag(repo, "v1", v1)
    head = env.add_repo(repo, {"adapter_model.safetensors": (models["a1"] / "adapter_model.safetensors").read_bytes()})
    assert "records" in fails(capsys, "pull", f"{repo}@v1")  # v1's bytes are not what it claims
    pulled = json.loads(ok("pull", repo, "--json"))
    assert pulled["commit_id"] == head and pulled["hub_version"] is None and pulled["revision"] == "main"


def test_refs_between_a_commit_and_its_tag_are_never_cached(env, team, models):
    """A push commits, then tags. A listing in between sees the head claim v2 with no tag v2:
    those refs must not be reused once the tag exists (the head does not change then)."""
    r0 = team[0]
    listing(env)
    ok("push", str(models["a2"]), r0)
    v2 = env.tags(r0)["v2"]
    with env.state.lock:  # the moment between the commit and its tag
        del env.state.repos[r0].tags["v2"]
    rows, calls, _ = listing(env)
    assert view(rows, r0) == [(r0, "v1", [])] and refs_read(calls) == [r0]
    rows, calls, _ = listing(env)
    assert refs_read(calls) == [r0]  # not cached: read again while the tag is missing
    env.add_tag(r0, "v2", v2)  # the pusher finishes
    rows, calls, _ = listing(env)
    assert view(rows, r0) == [(r0, "v1", []), (r0, "v2", [])] and refs_read(calls) == [r0]
    assert listing(env)[1] == ONE_LISTING


def test_an_alias_to_the_version_a_dying_push_left_untagged_tags_it(env, team, models):
    """`remote alias` repairs a head a push left untagged (as push and log-metric --push do)
    before it looks the version up: aliasing that very version works, and tags it."""
    r0 = team[0]
    ok("push", str(models["a2"]), r0)
    v2 = env.tags(r0)["v2"]
    with env.state.lock:  # the push died between its commit and its tag
        del env.state.repos[r0].tags["v2"]
    assert "-> v2" in ok("remote", "alias", r0, "prod", "v2")
    assert env.tags(r0)["v2"] == v2 and env.tags(r0)["prod"] == v2


def test_refs_between_an_alias_commit_and_its_tag_are_never_cached(env, team):
    r0 = team[0]
    commit_v1 = env.tags(r0)["v1"]
    ok("remote", "alias", r0, "prod", "v1")
    listing(env)
    with env.state.lock:  # `remote alias` committed the table, then died before creating the tag
        del env.state.repos[r0].tags["prod"]
    env.add_repo(r0, {"adapterhub.json": _with_aliases(env, r0, {"prod": "v1", "next": "v1"})})
    rows, calls, _ = listing(env)
    assert view(rows, r0) == [(r0, "v1", [])] and refs_read(calls) == [r0]
    assert refs_read(listing(env)[1]) == [r0]  # table and tags disagree: read again every time
    env.add_tag(r0, "prod", commit_v1)
    env.add_tag(r0, "next", commit_v1)
    rows, calls, _ = listing(env)
    assert view(rows, r0) == [(r0, "v1", ["next", "prod"])] and refs_read(calls) == [r0]
    assert listing(env)[1] == ONE_LISTING
    # the next `remote alias` on that repo finishes a half-done move too
    with env.state.lock:
        del env.state.repos[r0].tags["next"]
    ok("remote", "alias", r0, "prod", "v1")
    assert env.tags(r0)["prod"] == commit_v1


def _with_aliases(env, repo: str, aliases: dict) -> bytes:
    prov = json.loads(env.files(repo)["adapterhub.json"])
    prov["team"]["aliases"] = aliases
    return json.dumps(prov).encode()


def test_tags_made_by_other_tools_need_refresh(env, team):
    """A raw create_tag does not change the head: a repo whose refs are cached does not show it
    until --refresh; after that, refs we did not make keep the repo out of the cache."""
    r0 = team[0]
    listing(env)
    env.add_tag(r0, "raw", env.tags(r0)["v1"])
    rows, calls, _ = listing(env)
    assert calls == ONE_LISTING and view(rows, r0) == [(r0, "v1", [])]  # the documented limit
    rows, calls, _ = listing(env, "--refresh")
    assert view(rows, r0) == [(r0, "v1", ["raw"])]
    rows, calls, _ = listing(env)
    assert refs_read(calls) == [r0] and view(rows, r0) == [(r0, "v1", ["raw"])]  # not cached: not ours


def test_a_listing_without_heads_reads_every_repo(env, team):
    """A Hub-compatible server that ignores expand=sha (or sends junk) gives no head to key on:
    every call reads every repo's refs, nothing is trusted."""
    listing(env)
    for bad in (None, "A" * 40, "0" * 39, "0" * 40 + "\n", 7):
        env.state.hostile = {"listing_sha": bad}
        rows, calls, _ = listing(env)
        assert refs_read(calls) == team and len(view(rows)) == 3


def _cache_files(home: Path) -> list[Path]:
    return sorted((home / "hub-cache" / "refs").glob("*.json"))


def corruptions(doc: dict) -> dict[str, bytes]:
    def edit(**kw):
        return json.dumps({**doc, **kw}).encode()

    v1 = doc["versions"]["1"]
    return {
        "not json": b"{\"format\": ",
        "a list": b"[1, 2, 3]",
        "empty": b"",
        "binary": bytes(range(256)),
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "huge": b'{"x": "' + b"x" * (3 << 20) + b'"}',
        "bad sha": edit(versions={"1": "z" * 40}),
        "upper sha": edit(versions={"1": v1.upper()}),
        "short sha": edit(versions={"1": v1[:39]}),
        "newline sha": edit(versions={"1": v1 + "\n"}),
        "sha is a number": edit(versions={"1": 7}),
        "head not hex": edit(head="A" * 40),
        "other head": edit(head="0" * 40),
        "version key": edit(versions={"01": v1}),
        "version key newline": edit(versions={"1\n": v1}),
        "versions a list": edit(versions=[v1]),
        "alias like a version": edit(aliases={"v9": v1}),
        "alias with escape": edit(aliases={"a\x1b[2J": v1}),
        "other repo": edit(repo_id="cache/elsewhere"),
        "other endpoint": edit(endpoint="https://huggingface.co"),
        "unknown key": edit(extra=1),
        "format version": edit(format_version=2),
        # well-formed, but not what the head's adapterhub.json says: not trusted either
        "alias the head does not name": edit(aliases={"prod": v1}),
        "version missing": edit(versions={}),
    }


def test_a_corrupt_or_hostile_cache_file_is_ignored(env, team, monkeypatch):
    home = Path(os.environ["ADAPTERS_HOME"])
    rows, _, _ = listing(env)
    files = _cache_files(home)
    assert len(files) == 3
    target = next(f for f in files if json.loads(f.read_text())["repo_id"] == team[1])
    good = json.loads(target.read_text())
    assert good["head"] == env.head(team[1]) and good["versions"] == {"1": env.tags(team[1])["v1"]}
    for kind, data in corruptions(good).items():
        target.write_bytes(data)
        again, calls, err = listing(env)
        assert again == rows, kind
        assert refs_read(calls) == [team[1]], kind  # read from the Hub again, nothing else
        assert json.loads(target.read_text()) == good, kind  # and the file rewritten
    target.unlink()
    target.mkdir()  # not even a file
    again, calls, _ = listing(env)
    assert again == rows and refs_read(calls) == [team[1]]
    target.rmdir()
    # a corrupt cached adapterhub.json is downloaded again, never a traceback
    for f in (home / "hub-cache").glob("*/*.json"):
        if f.parent.name != "refs":
            f.write_bytes(b"{not json")
    again, calls, _ = listing(env)
    assert again == rows and downloads(calls) == 3


def test_a_cache_that_cannot_be_written_costs_requests_not_the_listing(env, team):
    """A full disk or a hub-cache that is not a folder: `remote list` still lists, reading
    everything from the Hub (both caches are an optimisation, never a reason to fail)."""
    home = Path(os.environ["ADAPTERS_HOME"])
    rows, _, _ = listing(env)
    shutil.rmtree(home / "hub-cache")
    (home / "hub-cache").write_bytes(b"not a folder")
    again, calls, _ = listing(env)
    # each head is its v1 commit: its adapterhub.json is fetched for the head and for v1, nothing kept
    assert again == rows and refs_read(calls) == team and downloads(calls) == 6
    (home / "hub-cache").unlink()


def test_a_commit_id_with_a_trailing_newline_is_refused(env, team):
    env.state.hostile = {"tags": {"prod": env.tags(team[0])["v1"] + "\n"}}
    res = CliRunner().invoke(cli, ["remote", "list", ORG, "--json"], catch_exceptions=False)
    assert json.loads(res.stdout) == [] and "invalid commit" in res.stderr


def _title(env, repo: str, commit: str) -> str:
    with env.state.lock:
        return env.state.repos[repo].commits[commit].title


MOVER = r"""
import sys
from adapterhub_local.cli import main
sys.argv = ["adapters", "remote", "alias", sys.argv[1], "prod", sys.argv[2], "--json"]
main()
"""


def test_concurrent_alias_moves_end_where_the_last_table_says(env, models, tmp_path):
    """4 processes move one alias at once (2 to v1, 2 to v2) while the Hub holds every commit
    0.2 s: the tag ends where the table at the head says, every machine's listing agrees, and
    the alias commits made no version."""
    repo = "race/alias"
    ok("push", str(models["a1"]), repo)
    ok("push", str(models["a2"]), repo)
    tags = env.tags(repo)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    base_env.update(HF_ENDPOINT=env.url, HF_TOKEN=ALICE, HF_HUB_DISABLE_XET="1", ADAPTERS_PROGRESS="0",
                    HF_HOME=str(tmp_path / "hf"))
    env.state.commit_delay = 0.2
    try:
        procs = [subprocess.Popen([sys.executable, "-c", MOVER, repo, v],
                                  env=dict(base_env, ADAPTERS_HOME=str(tmp_path / f"home{i}")),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i, v in enumerate(["v1", "v2", "v1", "v2"])]
        results = []
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
            results.append(json.loads(out))
    finally:
        env.state.commit_delay = 0.0
    table = json.loads(env.files(repo)["adapterhub.json"])["team"]["aliases"]
    final = env.tags(repo)
    assert {k: v for k, v in final.items() if k != "prod"} == tags  # no version made, none moved
    assert final["prod"] == tags[table["prod"]]
    titles = [_title(env, repo, c) for c in env.commit_chain(repo)]  # newest first: the last table wins
    alias_commits = [t for t in titles if t.startswith("alias prod")]
    assert alias_commits[0] == f"alias prod -> {table['prod']}" and len(alias_commits) >= 2  # both ways committed
    assert table["prod"] in {r["now"] for r in results}  # the last one to commit left it there
    rows = [r for r in json.loads(ok("remote", "list", "race", "--json")) if r["repo"] == repo]
    assert [(r["tag"], r["aliases"]) for r in rows] == [(t, ["prod"] if t == table["prod"] else [])
                                                        for t in ("v1", "v2")]
    env.clear_requests()
    ok("remote", "list", "race", "--json")
    assert hub_calls(env) == ONE_LISTING


def test_listing_pages_are_counted_and_never_followed_off_the_endpoint(env, team, capsys):
    from test_hub import fails

    env.state.page_size = 2
    try:
        rows, calls, err = listing(env)
        assert [p for _, p in calls if p == "/api/models"] == ["/api/models"] * 2 and len(view(rows)) == 3
        assert "2 listing pages, 3 refs reads" in err
        assert listing(env)[1] == ONE_LISTING * 2  # unchanged: the pages alone
        with HubServer() as other:  # a next page on another host: the token is not sent there
            real = env.state.base_url
            env.state.base_url = other.url
            try:
                line = fails(capsys, "remote", "list", ORG)
            finally:
                env.state.base_url = real
            assert "sends the next page elsewhere" in line and not other.state.requests
    finally:
        env.state.page_size = 1000


def test_a_listing_that_pages_without_repos_is_refused(env, team, capsys):
    """A next link on a page that lists no repo is no progress: a server sending those forever
    (each one back to the same query) would never let `remote list` end. One line, no walk."""
    from test_hub import fails

    env.state.hostile = {"empty_pages": 50}
    env.clear_requests()
    line = fails(capsys, "remote", "list", ORG)
    assert "a page with no repo" in line
    assert [p for _, p in hub_calls(env)] == ["/api/models"]


def _drop_provenance(env, repo: str) -> str:
    """A commit on main without adapterhub.json (deleted on the Hub's web page, say)."""
    st = env.state
    with st.lock:
        r = st.repos[repo]
        base = st.resolve_rev(r, "main")
        commit = st.new_commit(r, base, {k: v for k, v in base.files.items() if k != "adapterhub.json"},
                               "Delete adapterhub.json")
        r.branches["main"] = commit.id
        return commit.id


def test_an_alias_on_a_head_without_adapterhub_json_is_seen_by_every_machine(env, team, elsewhere):
    """`remote alias` cannot commit an alias table where the head has no adapterhub.json: it moves
    the tag alone, the head stays. Refs of such a head must not be cached, or another machine
    never sees the alias (the head it keys on did not change)."""
    r0 = team[0]
    _drop_provenance(env, r0)
    rows, _, _ = listing(env)
    assert view(rows, r0) == [(r0, "v1", [])]
    head = env.head(r0)
    elsewhere("remote", "alias", r0, "prod", "v1")
    assert env.head(r0) == head and env.tags(r0)["prod"] == env.tags(r0)["v1"]  # a tag, no commit
    rows, calls, _ = listing(env)
    assert view(rows, r0) == [(r0, "v1", ["prod"])] and refs_read(calls) == [r0]
    elsewhere("remote", "alias", r0, "prod", "--rm")
    rows, calls, _ = listing(env)
    assert view(rows, r0) == [(r0, "v1", [])] and refs_read(calls) == [r0]


def test_mistakes_in_the_command_cost_no_request(env, capsys):
    """A repo id where a namespace belongs, a bad --where and a bad --sort are one line each,
    before anything is asked of the Hub."""
    for args, needle in ((["remote", "list", f"{ORG}/x"], f"'{ORG}/x' is a repo; this takes a namespace"),
                         (["sync", f"{ORG}/x"], f"'{ORG}/x' is a repo; this takes a namespace"),
                         (["remote", "list", "bad name!"], "invalid namespace 'bad name!'"),
                         (["remote", "list", ORG, "--where", "eval_loss<<1"], "eval_loss<<1"),
                         (["remote", "list", ORG, "--sort", "created"], "cannot sort by created")):
        env.clear_requests()
        err = fails(capsys, *args)
        assert needle in err, (args, err)
        assert hub_calls(env) == [], (args, hub_calls(env))
