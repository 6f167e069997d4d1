"""The everyday verbs start without torch or transformers (nor tqdm when progress bars are
off, as in scripts): each is run for real, in its own subprocess, against tiny inputs written
with numpy (tiny_np.py), and the process's ``sys.modules`` is read when it ends. Start-up
*times* live in benchmarks/cli.py."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
from tiny_np import make_adapter, make_base

from adapterhub_local.cli import cli

HEAVY = ("torch", "transformers", "tqdm")

# the verb's arguments ({base}, {adapter}, {tmp} filled in) and a line its output must hold
VERBS = {
    "list": (["list", "--json"], '"name": "a"'),
    "register": (["register", "{adapter}", "--name", "b", "--base", "{base}"], "registered b@1"),
    "show": (["show", "a"], "a@1"),
    "inspect": (["inspect", "{adapter}"], "model.layers.1.self_attn.v_proj"),
    "verify": (["verify", "a"], "ok"),
    "export": (["export", "a", "{tmp}/exported"], "exported"),
    "fingerprint": (["fingerprint", "{base}"], "sha256:"),
    "push --dry-run": (["push", "a", "me/tiny", "--dry-run", "--dry-run-dir", "{tmp}/staged"], "nothing was sent"),
    "check": (["check", "a", "--for", "vllm", "--base", "{base}"], "vLLM 0.33: ok"),
}

PROBE = """
import sys
from adapterhub_local.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    if e.code:
        raise
print("HEAVY", sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("startup")
    base = make_base(root / "base")
    adapter = make_adapter(root / "adapter", base)
    home = root / "home"
    env = {**os.environ, "ADAPTERS_HOME": str(home), "ADAPTERS_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", "from adapterhub_local.cli import main; main()", "register",
                        str(adapter), "--name", "a", "--base", str(base)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return {"base": str(base), "adapter": str(adapter), "env": env}


def run_verb(args: list[str], env: dict) -> tuple[list[str], str]:
    r = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, f"adapters {' '.join(args)} failed:\n{r.stderr[-3000:]}"
    out, _, last = r.stdout.rstrip("\n").rpartition("\n")
    assert last.startswith("HEAVY "), r.stdout
    return ast.literal_eval(last[6:]), out


def test_every_listed_verb_exists():
    assert {v.split()[0] for v in VERBS} <= set(cli.commands)


@pytest.mark.parametrize("verb", list(VERBS))
def test_verb_imports_no_torch(verb, inputs, tmp_path):
    template, expect = VERBS[verb]
    args = [a.format(base=inputs["base"], adapter=inputs["adapter"], tmp=tmp_path) for a in template]
    heavy, out = run_verb(args, inputs["env"])
    assert expect in out, out
    assert heavy == [], f"adapters {verb} imported {heavy}"


def test_the_probe_sees_an_import(inputs):
    # a probe that never reports anything would pass every verb: make one import torch
    code = "import sys; sys.modules.setdefault('torch', object())\n" + PROBE.format(heavy=HEAVY)
    r = subprocess.run([sys.executable, "-c", code, "list"], capture_output=True, text=True, env=inputs["env"])
    assert r.stdout.rstrip().endswith("HEAVY ['torch']"), r.stdout + r.stderr


def test_the_quiet_bar_still_writes(monkeypatch, capsys):
    from adapterhub_local.progress import bar

    monkeypatch.setenv("ADAPTERS_PROGRESS", "0")
    with bar(3, "x", "it") as pb:
        pb.update()
        pb.set_postfix(loss="1.0")
        pb.write("step 1: eval loss 1.0", file=sys.stderr)
    pb.close()
    assert capsys.readouterr().err == "step 1: eval loss 1.0\n"
    monkeypatch.setenv("ADAPTERS_PROGRESS", "1")
    shown = bar(3, "x", "it")
    assert type(shown).__name__ == "tqdm" or type(shown).__module__.startswith("tqdm"), type(shown)
    shown.close()


def test_reading_the_registry_imports_neither_sqlite_utils_nor_numpy(inputs):
    # sqlite_utils imports numpy (~0.1 s); it is needed only when a schema step must run
    for args in (["list", "--json"], ["show", "a"]):
        r = subprocess.run([sys.executable, "-c", PROBE.format(heavy=("sqlite_utils", "numpy")), *args],
                           capture_output=True, text=True, env=inputs["env"])
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.rstrip().endswith("HEAVY []"), (args, r.stdout[-300:])


def test_applied_steps_are_read_as_sqlite_utils_reads_them(tmp_path):
    from adapterhub_local.registry import open_registry
    from adapterhub_local.registry.schema import KNOWN, migrations
    from sqlite_utils import Database, Migrations

    reg = open_registry(tmp_path / "h")
    reg.conn.execute("INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
                     "VALUES ('another-app', 'm001_theirs', 'x')")
    theirs = Migrations(migrations.name)
    for fn in migrations.steps:
        theirs()(fn)
    names = [m.name for m in theirs.applied(Database(reg.conn))]
    assert names == migrations.applied(reg.conn) == KNOWN and len(KNOWN) >= 2
    assert theirs.pending(Database(reg.conn)) == []
    reg.close()


@pytest.mark.parametrize("verb", sorted(set(VERBS) - {"inspect"}))
def test_header_only_verbs_import_no_numpy(verb, inputs, tmp_path):
    """Every verb but inspect (which prints ‖ΔW‖) reads safetensors headers, and register and
    push scan the values for inf/NaN in C (peft_format.check_adapter): numpy (~0.15 s) is not
    imported, nor sqlite_utils (which imports it) to create a registry."""
    template, expect = VERBS[verb]
    args = [a.format(base=inputs["base"], adapter=inputs["adapter"], tmp=tmp_path) for a in template]
    env = {**inputs["env"], "ADAPTERS_HOME": str(tmp_path / "new")} if verb == "register" else inputs["env"]
    r = subprocess.run([sys.executable, "-c", PROBE.format(heavy=(*HEAVY, "numpy", "sqlite_utils")), *args],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.rstrip().endswith("HEAVY []"), r.stdout[-500:]


def test_a_registry_begun_by_sqlite_utils_migrations_is_finished_by_ours(tmp_path):
    # earlier versions ran the steps through sqlite_utils.Migrations: a registry they left at
    # m001 gets the later steps from our runner, in the same table, each exactly once
    import sqlite3

    from adapterhub_local.registry import open_registry
    from adapterhub_local.registry.schema import KNOWN, migrations
    from sqlite_utils import Database, Migrations

    home = tmp_path / "h"
    home.mkdir()
    conn = sqlite3.connect(home / "registry.db")
    theirs = Migrations(migrations.name)
    theirs()(migrations.steps[0])
    theirs.apply(Database(conn))
    conn.close()
    reg = open_registry(home)
    rows = reg.conn.execute("SELECT migration_set, name FROM _sqlite_migrations ORDER BY id").fetchall()
    assert rows == [(migrations.name, n) for n in KNOWN]
    assert reg.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reg.close()


def test_a_failing_step_leaves_no_trace_and_stays_pending(tmp_path):
    import sqlite3

    from adapterhub_local.registry.schema import _run, _Steps

    steps = _Steps()

    @steps()
    def m001_ok(db):
        _run(db, "CREATE TABLE a (x INTEGER); CREATE TABLE b (y INTEGER)")

    @steps()
    def m002_breaks(db):
        db.execute("CREATE TABLE c (z INTEGER)")
        raise RuntimeError("step failed")

    conn = sqlite3.connect(tmp_path / "x.db")
    with pytest.raises(RuntimeError):
        steps.apply(conn)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"_sqlite_migrations", "a", "b"}  # m002's table rolled back with it
    assert steps.applied(conn) == ["m001_ok"]
    steps.steps[1] = m002_fixed = lambda db: db.execute("CREATE TABLE c (z INTEGER)")  # noqa: E731
    m002_fixed.__name__ = "m002_breaks"
    assert steps.apply(conn) == ["m002_breaks"]  # only the pending step runs, once
    assert steps.apply(conn) == []
    assert steps.applied(conn) == ["m001_ok", "m002_breaks"]
