"""Terminal safety (issue 12.6): control characters from files and servers are escaped before
they reach a terminal; --json stays valid JSON that round-trips the original strings."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from test_registry import make_adapter

from adapterhub_local.cli import cli, main
from adapterhub_local.terminal import safe_text

EVIL = "\x1b]0;pwned\x07\x1b[2J\x9b31m\u202eevil\u2066\x00x\ny"
# anything a terminal acts on: C0 but tab/newline, DEL, C1, bidi controls, line separators
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def run(*args) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert not RAW.search(res.stdout) and not RAW.search(res.stderr), repr(res.output)
    return res.stdout


def test_safe_text_escapes_every_class():
    assert safe_text("a\x1b[31mb") == "a\\x1b[31mb"
    assert safe_text("\x9b\x7f\x00") == "\\x9b\\x7f\\x00"
    assert safe_text("abc\u202edef\u2067") == "abc\\u202edef\\u2067"
    assert safe_text("a\tb\nc") == "a\\x09b\\x0ac"
    assert safe_text("a\tb\nc", one_line=False) == "a\tb\nc"
    assert safe_text("naïve ünïcode → ok") == "naïve ünïcode → ok"  # printable text is left alone
    assert not RAW.search(safe_text("".join(map(chr, range(0x3000)))))


@pytest.fixture
def evil_adapter(tmp_path):
    ad = make_adapter(tmp_path / "evil", base_model_name_or_path=EVIL)
    (ad / f"notes{EVIL[:12]}.txt").write_text("hello")  # a file name from someone else's folder
    return ad


def test_inspect_register_list_show_escape(evil_adapter, tmp_path):
    out = run("inspect", evil_adapter)
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u202eevil\\u2066\\x00x\\x0ay" in out
    out = run("register", evil_adapter, "--name", "evil", "--note", EVIL, "--tag", f"src={EVIL}")
    assert out.startswith("registered evil@1")
    run("list")
    out = run("show", "evil")
    assert "\\u202eevil" in out and "notes\\x1b]0;pwned\\x07" in out
    # --json: valid JSON, every control escaped by json itself, the value intact
    raw = CliRunner().invoke(cli, ["show", "evil", "--json"], catch_exceptions=False).stdout
    assert not RAW.search(raw) and raw.isascii()
    data = json.loads(raw)
    assert data["note"] == EVIL and data["base_model"] == EVIL and data["tags"]["src"] == EVIL
    raw = CliRunner().invoke(cli, ["inspect", str(evil_adapter), "--json"], catch_exceptions=False).stdout
    assert raw.isascii() and json.loads(raw)["base_model"] == EVIL


def test_error_lines_escape_names_from_files(tmp_path, capsys):
    bad = tmp_path / f"ad{EVIL.replace(chr(0), '')}"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{}")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(bad)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1, repr(err)
    assert not RAW.search(err) and "\\x1b]0;pwned" in err and "\\x0ay" in err


def test_push_dry_run_listing_escapes(evil_adapter, tmp_path):
    out = run("push", evil_adapter, "me/evil", "--dry-run", "--dry-run-dir", tmp_path / "stage")
    assert "notes\\x1b]0;pwned\\x07" in out


def test_merge_warnings_escape_input_names(tmp_path):
    a = make_adapter(tmp_path / "a\x1b[2Jx", seed=1)
    b = make_adapter(tmp_path / "b\u202eq", seed=2)
    res = CliRunner().invoke(cli, ["stack", str(a), str(b), "--out", str(tmp_path / "s")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "base unknown" in res.stderr and "a\\x1b[2Jx" in res.stderr and "b\\u202eq" in res.stderr
    assert not RAW.search(res.stdout) and not RAW.search(res.stderr), repr(res.output)
