"""The filesystem stays ours (issue 12.3): nothing inside an input folder is followed out of it,
--out is never an input, inside or above one, or a registry; SIGTERM and Ctrl-C clean up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_registry import make_adapter

from adapterhub_local.cli import cli, main

SECRET = "-----BEGIN OPENSSH PRIVATE KEY----- not for the Hub"


def ok(*args) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.stdout


def fails(capsys, *args) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert e.value.code == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert SECRET not in out + err
    return err


@pytest.fixture
def secret(tmp_path):
    p = tmp_path / "id_rsa"
    p.write_text(SECRET)
    return p


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from tiny import make_llama

    return make_llama(tmp_path_factory.mktemp("fsbase") / "base")


def _blobs(tmp_path) -> list[Path]:
    root = tmp_path / "home" / "blobs"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def _plant(folder: Path, kind: str, secret: Path, name: str = "README.md") -> str:
    target = folder / name
    if target.exists():
        target.unlink()
    if kind == "symlink":
        target.symlink_to(secret)
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "dirlink":
        target.symlink_to(secret.parent, target_is_directory=True)
    return name


@pytest.mark.parametrize("kind", ["symlink", "fifo", "dirlink"])
def test_register_refuses_links_and_special_files(kind, tmp_path, secret, capsys):
    ad = make_adapter(tmp_path / "ad")
    name = _plant(ad, kind, secret)
    err = fails(capsys, "register", ad, "--name", "x")
    assert name in err and ("symbolic link" in err or "FIFO" in err)
    assert not _blobs(tmp_path)  # nothing of it was stored
    assert ok("list", "--json").strip() == "[]"


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_push_dry_run_refuses(kind, tmp_path, secret, capsys):
    ad = make_adapter(tmp_path / "ad")
    _plant(ad, kind, secret, "notes.txt")
    err = fails(capsys, "push", ad, "me/x", "--dry-run", "--dry-run-dir", tmp_path / "stage")
    assert "notes.txt" in err
    assert not (tmp_path / "stage").exists() or not any((tmp_path / "stage").iterdir())


def test_push_dry_run_of_model_folder_refuses_nested_link(base, tmp_path, secret, capsys):
    import shutil

    m = tmp_path / "model"
    shutil.copytree(base, m)
    (m / "extra").mkdir()
    (m / "extra" / "vocab.txt").symlink_to(secret)
    err = fails(capsys, "push", m, "me/x", "--dry-run", "--dry-run-dir", tmp_path / "stage")
    assert "vocab.txt" in err


@pytest.mark.parametrize("where", ["adapter", "base", "base-shard"])
def test_merge_refuses_links_in_adapter_and_base(where, base, tmp_path, secret, capsys):
    import shutil

    ad = make_adapter(tmp_path / "ad")
    b = tmp_path / "b"
    shutil.copytree(base, b)
    if where == "adapter":
        _plant(ad, "symlink", secret, "tokenizer.json")
    elif where == "base":
        _plant(b, "symlink", secret, "tokenizer.json")  # a side file a merge would copy
    else:
        real = tmp_path / "elsewhere.safetensors"
        shutil.move(b / "model.safetensors", real)
        (b / "model.safetensors").symlink_to(real)
    err = fails(capsys, "merge", b, ad, "--out", tmp_path / "out")
    assert ("tokenizer.json" if where != "base-shard" else "model.safetensors") in err
    assert not (tmp_path / "out").exists()
    err = fails(capsys, "merge", ad, ad, "--into-adapter", "--out", tmp_path / "out2") if where == "adapter" \
        else fails(capsys, "fingerprint", b)
    assert not (tmp_path / "out2").exists()


def test_inspect_refuses_symlinked_weights(tmp_path, secret, capsys):
    ad = make_adapter(tmp_path / "ad")
    real = tmp_path / "w.safetensors"
    (ad / "adapter_model.safetensors").rename(real)
    (ad / "adapter_model.safetensors").symlink_to(real)
    assert "adapter_model.safetensors" in fails(capsys, "inspect", ad)


def test_open_regular_refuses_fifo_and_link_without_blocking(tmp_path, secret):
    from adapterhub_local.errors import UnsafeInput
    from adapterhub_local.fsutil import open_regular

    os.mkfifo(tmp_path / "pipe")  # opening it plainly for reading would block forever
    (tmp_path / "link").symlink_to(secret)
    for name in ("pipe", "link"):
        with pytest.raises(UnsafeInput, match=name):
            open_regular(tmp_path / name)
    os.close(open_regular(secret))


# -- --out ------------------------------------------------------------------------------------

def test_out_never_an_input_or_above_one(base, tmp_path, capsys):
    import shutil

    b = tmp_path / "models" / "base"
    shutil.copytree(base, b)
    ad = make_adapter(tmp_path / "ad")
    before = sorted(p.name for p in b.iterdir())
    link = tmp_path / "sneaky"
    link.symlink_to(b.parent)  # resolves to the base's parent
    for out in (b, b.parent, link, b / "sub", tmp_path):
        for extra in ([], ["--overwrite"]):
            err = fails(capsys, "merge", b, ad, "--out", out, *extra)
            assert "refused" in err and "output folder" in err
    assert sorted(p.name for p in b.iterdir()) == before
    for out in (ad, ad / "inner", ad.parent):
        fails(capsys, "merge", ad, ad, "--into-adapter", "--out", out, "--overwrite")
        fails(capsys, "stack", ad, "--out", out, "--overwrite")
        fails(capsys, "interpolate", ad, ad, "--t", "0.5", "--out", out, "--overwrite")
    assert (ad / "adapter_model.safetensors").is_file() and not (ad / "inner").exists()
    tuned = tmp_path / "tuned"
    shutil.copytree(base, tuned)
    for out in (tuned, b, tmp_path / "models"):
        fails(capsys, "extract", b, tuned, "--rank", "2", "--out", out, "--overwrite")


def test_out_never_the_registry_home(tmp_path, capsys):
    ad = make_adapter(tmp_path / "ad")
    home = tmp_path / "reg"
    ok("--registry", home, "register", ad, "--name", "a")
    for out in (home, home / "blobs", home.parent):
        err = fails(capsys, "--registry", home, "export", "a", out, "--overwrite")
        assert "registry home" in err
        fails(capsys, "--registry", home, "stack", "a", "--out", out, "--overwrite")
    # the default home ($ADAPTERS_HOME) is protected too, whatever --registry says
    ok("register", ad, "--name", "b")
    fails(capsys, "--registry", home, "export", "a", Path(os.environ["ADAPTERS_HOME"]), "--overwrite")
    assert ok("--registry", home, "list", "--json").count('"ref"') == 1
    assert ok("list", "--json").count('"ref"') == 1
    out = tmp_path / "fine"
    ok("--registry", home, "export", "a", out)
    assert (out / "adapter_model.safetensors").is_file()


# -- signals ----------------------------------------------------------------------------------

SLOW_MERGE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from adapterhub_local.merge import io
    marker = Path(sys.argv[1])
    for name in ("view", "read_into"):
        orig = getattr(io.Reader, name)
        def slow(self, *a, _orig=orig, **k):
            marker.touch()
            time.sleep(0.05)
            return _orig(self, *a, **k)
        setattr(io.Reader, name, slow)
    from adapterhub_local.cli import main
    main(sys.argv[2:])
""")


@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 143, "terminated"),
                                           (signal.SIGINT, 130, "interrupted")])
def test_signal_mid_merge_leaves_nothing(sig, code, word, base, tmp_path):
    ad = make_adapter(tmp_path / "ad")
    out = tmp_path / "merged"
    marker = tmp_path / "reading"
    env = {**os.environ, "ADAPTERS_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, str(marker), "merge", str(base), str(ad),
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.01)
    assert any(p.name.endswith(".partial") for p in tmp_path.iterdir())  # mid-merge, for real
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == f"error: {word}; nothing half-written was left behind", err
    assert "Aborted" not in err and "Traceback" not in err
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial") or ".old-" in p.name]


@pytest.mark.parametrize("shard", ["../elsewhere.safetensors", "/etc/passwd", "sub/x.safetensors", ".."])
def test_index_shard_names_stay_inside_the_folder(shard, base, tmp_path, capsys):
    import json
    import shutil

    b = tmp_path / "b"
    shutil.copytree(base, b)
    (b / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    err = fails(capsys, "fingerprint", b)
    assert "is not a file name inside the folder" in err


def test_convert_out_never_an_input_or_the_registry(tmp_path, capsys):
    ad = make_adapter(tmp_path / "ad")
    home = tmp_path / "reg"
    ok("--registry", home, "register", ad, "--name", "a")
    for out in (ad, ad / "x", tmp_path):
        fails(capsys, "convert", ad, "--for", "vllm", "--out", out, "--overwrite")
    assert "registry home" in fails(capsys, "--registry", home, "convert", "a", "--for", "vllm", "--out", home,
                                    "--overwrite")
    assert (ad / "adapter_model.safetensors").is_file() and (home / "registry.db").is_file()
