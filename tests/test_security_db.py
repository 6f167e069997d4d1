"""Other people's databases are left alone; --where takes any number of conditions (issue 12.5)."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import pytest
from adapterhub_local.registry import open_registry
from adapterhub_local.registry.query import MAX_CONDITIONS
from click.testing import CliRunner
from test_registry import make_adapter

from adapterhub_local.cli import cli, main


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fails(capsys, *args) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _foreign(home, journal: str = "delete", migrations_of: str | None = None):
    home.mkdir(parents=True, exist_ok=True)
    db = home / "registry.db"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA journal_mode = {journal}")
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    conn.execute("INSERT INTO notes (body) VALUES ('my diary')")
    if migrations_of:  # another sqlite-utils application: a migrations table, not our set
        conn.execute("CREATE TABLE _sqlite_migrations (migration_set TEXT, name TEXT, applied_at TEXT)")
        conn.execute("INSERT INTO _sqlite_migrations VALUES (?, 'm001', '2026-01-01')", (migrations_of,))
    conn.commit()
    conn.close()
    return db


@pytest.mark.parametrize("verb", [["list"], ["show", "x"], ["gc"], ["verify"], ["register", "ADAPTER", "--name", "x"]])
def test_foreign_database_refused_before_any_write(verb, tmp_path, capsys):
    home = tmp_path / "other-app"
    db = _foreign(home)
    before = _sha(db)
    adapter = make_adapter(tmp_path / "a")
    args = [str(adapter) if a == "ADAPTER" else a for a in verb]
    err = _fails(capsys, "--registry", home, *args)
    assert "not an adapterhub-local registry" in err and "notes" in err
    assert _sha(db) == before  # byte-identical: no migrations table, no journal-mode change
    assert sorted(p.name for p in home.iterdir()) == ["registry.db"]  # no -wal, -shm, locks, blobs/
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["notes"]
    conn.close()


def test_foreign_wal_database_and_other_sqlite_utils_app_refused(tmp_path, capsys):
    wal = _foreign(tmp_path / "wal", journal="wal")
    before = _sha(wal)
    _fails(capsys, "--registry", tmp_path / "wal", "list")
    assert _sha(wal) == before and sorted(p.name for p in (tmp_path / "wal").iterdir()) == ["registry.db"]
    other = _foreign(tmp_path / "utils", migrations_of="someone-else")
    before = _sha(other)
    assert "_sqlite_migrations, notes" in _fails(capsys, "--registry", tmp_path / "utils", "list")
    assert _sha(other) == before


def test_empty_file_and_real_registry_still_open(tmp_path):
    home = tmp_path / "home2"
    home.mkdir()
    (home / "registry.db").write_bytes(b"")  # `touch registry.db`: a new registry
    res = CliRunner().invoke(cli, ["--registry", str(home), "list", "--json"], catch_exceptions=False)
    assert res.exit_code == 0 and res.stdout.strip() == "[]"
    open_registry(home).close()  # and it opens again as ours
    # a registry another process is creating: the migrations table exists, m001 not yet recorded
    racing = tmp_path / "racing"
    racing.mkdir()
    conn = sqlite3.connect(racing / "registry.db")
    conn.execute("CREATE TABLE _sqlite_migrations (migration_set TEXT, name TEXT, applied_at TEXT)")
    conn.commit()
    conn.close()
    open_registry(racing).close()


def _metrics(n: int, value: float) -> list[str]:
    return [a for i in range(n) for a in ("--metric", f"m{i}={value + i}")]


def test_where_with_200_metric_conditions(tmp_path, capsys):
    home = tmp_path / "h"
    for name, value in (("low", 0.0), ("high", 1.0)):
        res = CliRunner().invoke(cli, ["--registry", str(home), "register", str(make_adapter(tmp_path / name)),
                                       "--name", name, *_metrics(200, value)], catch_exceptions=False)
        assert res.exit_code == 0, res.output
    # every condition holds for `low` only: m_i < i + 0.5
    conds = " and ".join(f"m{i}<{i + 0.5}" for i in range(200))
    res = CliRunner().invoke(cli, ["--registry", str(home), "list", "--where", conds, "--json"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert [r["ref"] for r in json.loads(res.stdout)] == ["low@1"]
    # the same conditions as 200 --where options, one of them failing for both
    args = [a for i in range(200) for a in ("--where", f"m{i}>={i}")] + ["--where", "m199>1000"]
    res = CliRunner().invoke(cli, ["--registry", str(home), "list", *args, "--json"], catch_exceptions=False)
    assert res.exit_code == 0 and res.stdout.strip() == "[]"
    args = [a for i in range(200) for a in ("--where", f"m{i}>={i}")]
    res = CliRunner().invoke(cli, ["--registry", str(home), "list", *args, "--json", "--sort", "-m150"],
                             catch_exceptions=False)
    assert [r["ref"] for r in json.loads(res.stdout)] == ["high@1", "low@1"]
    # past the bound: one line, no SQLite traceback
    many = " and ".join(f"k{i}<1" for i in range(MAX_CONDITIONS + 1))
    err = _fails(capsys, "--registry", home, "list", "--where", many)
    assert f"more than {MAX_CONDITIONS} --where conditions" in err


def test_where_with_long_blank_runs_parses_fast(tmp_path, capsys):
    home = tmp_path / "h"
    CliRunner().invoke(cli, ["--registry", str(home), "list"], catch_exceptions=False)
    # a quadratic split would spin on this; the parser collapses blanks first
    err = _fails(capsys, "--registry", home, "list", "--where", "a<1 and" + " " * 90_000 + "b")
    assert "cannot parse condition 'b'" in err
    err = _fails(capsys, "--registry", home, "list", "--where", "x" * 200_000)
    assert "too long" in err
