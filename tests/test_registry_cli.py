"""The registry verbs through the CLI: output, --json, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_registry import make_adapter

from adapterhub_local.cli import cli, main

VERBS = ["register", "list", "show", "alias", "log-metric", "export", "rm", "gc", "verify"]


def run(*args) -> str:
    result = CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def run_json(*args):
    return json.loads(run(*args, "--json"))


def fails(capsys, *args, code: int = 1) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(list(map(str, args)))
    err = capsys.readouterr().err
    assert e.value.code == code, err
    assert "Traceback" not in err
    if code == 1:
        assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def adapters(tmp_path):
    return [make_adapter(tmp_path / f"a{i}", seed=i) for i in range(3)]


def test_register_list_show_roundtrip(adapters, tmp_path):
    out = run("register", adapters[0], "--name", "support", "--metric", "eval_loss=1.3", "--tag", "domain=help",
              "--alias", "staging", "--note", "first try")
    assert out.startswith("registered support@1")
    rec = run_json("register", adapters[1], "--name", "support", "--metric", "eval_loss=1.1", "--parent", "support@1")
    assert rec["ref"] == "support@2" and rec["is_new"] and rec["parents"] == ["support@1"]
    out = run("register", adapters[1], "--name", "support")
    assert out.startswith("unchanged support@2")
    run("register", adapters[2], "--name", "legal", "--metric", "eval_loss=0.7")
    table = run("list")
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["NAME", "VERSION", "ALIASES", "BASE", "RANK"] and "EVAL_LOSS" in lines[0]
    assert [ln.split()[0] + "@" + ln.split()[1] for ln in lines[1:]] == ["legal@1", "support@2", "support@1"]
    rows = run_json("list", "--where", "eval_loss<1.2", "--sort", "eval_loss")
    assert [r["ref"] for r in rows] == ["legal@1", "support@2"]
    rows = run_json("list", "--where", "eval_loss>0.5", "--where", "eval_loss<=1.1")
    assert [r["ref"] for r in rows] == ["legal@1", "support@2"]
    assert [r["ref"] for r in run_json("list", "--name", "sup*", "--latest")] == ["support@2"]
    assert [r["ref"] for r in run_json("list", "--alias", "staging")] == ["support@1"]
    assert len(run_json("list", "--limit", "1")) == 1
    shown = run("show", "support@1")
    for text in ("support@1", "staging", "domain=help", "first try", "support@2", "eval_loss",
                 "adapter_model.safetensors"):
        assert text in shown
    d = run_json("show", "support")
    assert d["ref"] == "support@2" and d["parents"] == ["support@1"] and d["metrics"] == {"eval_loss": 1.1}
    assert "merges" in d and "ancestors" in d


def test_alias_log_metric_export_rm_gc_verify(adapters, tmp_path):
    run("register", adapters[0], "--name", "s")
    run("register", adapters[1], "--name", "s")
    assert run("alias", "s@1", "prod").strip() == "s:prod -> s@1"
    assert run("alias", "s@2", "prod").strip() == "s:prod -> s@2 (was s@1)"
    assert run_json("show", "s:prod")["version"] == 2
    assert "removed s:prod" in run("alias", "--rm", "s", "prod")
    out = run("log-metric", "s@1", "loss=0.8", "acc=0.9", "--split", "eval", "--step", "100")
    assert "eval_loss=0.8" in out and "eval_acc=0.9" in out
    hist = run_json("show", "s@1", "--history")["metric_history"]
    assert {(h["key"], h["step"], h["split"]) for h in hist} == {("loss", 100, "eval"), ("acc", 100, "eval")}
    out = run("export", "s@1", tmp_path / "exp")
    assert "exported s@1" in out
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "adapterhub.json"]
    assert json.loads((tmp_path / "exp" / "adapterhub.json").read_text())["registry"]["ref"] == "s@1"
    report = run_json("verify")
    assert report["ok"] and report["versions"] == 2
    assert "ok: 2 version(s)" in run("verify")
    assert run_json("rm", "s@1")["removed"] == "s@1"
    assert [r["ref"] for r in run_json("list")] == ["s@2"]
    assert run_json("gc")["blobs_removed"] == 0
    assert "would free" in run("gc", "--dry-run")


def test_registry_option_and_env(adapters, tmp_path, monkeypatch):
    run("--registry", tmp_path / "explicit", "register", adapters[0], "--name", "x")
    assert (tmp_path / "explicit" / "registry.db").is_file()
    assert run_json("--registry", tmp_path / "explicit", "list")[0]["ref"] == "x@1"
    assert run_json("list") == []  # $ADAPTERS_HOME (the test's own) is another registry


def test_errors_are_one_line(adapters, tmp_path, capsys):
    run("register", adapters[0], "--name", "support")
    err = fails(capsys, "show", "suport")
    assert "support" in err and "did you mean" in err
    assert "support@1" in fails(capsys, "show", "support@9")
    assert "key=value" in fails(capsys, "register", adapters[1], "--name", "x", "--metric", "eval_loss")
    assert "not a number" in fails(capsys, "log-metric", "support", "eval_loss=abc")
    assert "adapter_config.json" in fails(capsys, "register", tmp_path, "--name", "x")
    assert "cannot parse" in fails(capsys, "list", "--where", "eval_loss<<2")
    assert "bad adapter name" in fails(capsys, "register", adapters[1], "--name", "a/b")
    fails(capsys, "register", adapters[1], code=2)  # --name missing: a usage error
    assert "support:prod" in fails(capsys, "alias", "--rm", "support", "prod")
    assert run_json("list")[0]["ref"] == "support@1" and len(run_json("list")) == 1  # nothing changed


def test_bad_registry_files(tmp_path, capsys, adapters):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "registry.db").write_text("hello, I am not a database\n" * 5)
    assert "not an SQLite database" in fails(capsys, "--registry", bad, "list")
    assert (bad / "registry.db").read_text() == "hello, I am not a database\n" * 5
    run("--registry", tmp_path / "new", "register", adapters[0], "--name", "x")
    import sqlite3

    con = sqlite3.connect(tmp_path / "new" / "registry.db")
    con.execute("INSERT INTO _sqlite_migrations (migration_set, name, applied_at) VALUES "
                "('adapterhub-local', 'm900_from_the_future', 'x')")
    con.commit()
    con.close()
    assert "newer" in fails(capsys, "--registry", tmp_path / "new", "list")


def test_verify_and_export_report_corrupt_blob(adapters, tmp_path, capsys):
    rec = run_json("register", adapters[0], "--name", "x")
    sha = rec["files"]["adapter_model.safetensors"]
    blob = tmp_path / "home" / "blobs" / sha[:2] / sha  # $ADAPTERS_HOME from conftest
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["verify"])
    cap = capsys.readouterr()
    assert e.value.code == 1 and str(blob) in cap.out and sha in cap.out and "Traceback" not in cap.err
    err = fails(capsys, "export", "x", tmp_path / "out")
    assert str(blob) in err and sha in err and not (tmp_path / "out").exists()


def test_rm_refuses_merge_input(adapters, tmp_path, capsys):
    from adapterhub_local.registry import open_registry

    run("register", adapters[0], "--name", "a")
    run("register", adapters[1], "--name", "m")
    reg = open_registry()
    reg.record_merge(["a"], [1.0], "linear", {}, "m", {}, output_version="m")
    reg.close()
    assert "--force" in fails(capsys, "rm", "a")
    assert run_json("rm", "a", "--force")["dependents"]


def test_every_verb_has_help_with_example_and_docs():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    for verb in VERBS:
        out = run(verb, "--help")
        assert "Example" in out, verb
        assert f"adapters {verb}" in text, f"README.md does not show `adapters {verb}`"
    assert "--json" in run("list", "--help")


def test_list_does_not_import_torch(tmp_path):
    code = ("import sys\nfrom adapterhub_local.cli import main\ntry:\n    main(['list'])\nexcept SystemExit:\n"
            "    pass\nheavy = [m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
