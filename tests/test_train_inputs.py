"""`adapters train` refuses what would destroy its inputs or overflow, in one line, before any work."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import make_base, write_jsonl

ADAPTERS = str(Path(sys.executable).parent / "adapters")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_inputs")
    base = make_base(d / "base")
    data = write_jsonl(d / "data.jsonl", [{"text": "the cat sat on the mat"}] * 8)
    return d, base, data


def _train(d, base, data, *extra):
    return subprocess.run([ADAPTERS, "--registry", str(d / "home"), "train", str(base), "--data", str(data),
                           "--name", "x", "--max-steps", "1", *extra], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("lr", ["1e39", "inf", "nan", "0", "-1"])
def test_an_impossible_learning_rate_is_one_line(setup, lr):
    d, base, data = setup
    res = _train(d, base, data, "--lr", lr, "--out", str(d / "never"))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]  # ours ("error: --lr ...") or click's range check (exit 2)
    assert "--lr" in last and (last.startswith("error: --lr") or res.returncode == 2), res.stderr
    assert not (d / "never").exists()


@pytest.mark.parametrize("target", ["base", "parent", "home", "data_dir"])
def test_overwrite_never_deletes_an_input_or_the_registry(setup, target):
    d, base, data = setup
    (d / "home").mkdir(exist_ok=True)
    (d / "home" / "keep").write_text("registry")
    data_dir = d / "datadir"
    data_dir.mkdir(exist_ok=True)
    shutil.copy(data, data_dir / "data.jsonl")
    out = {"base": base, "parent": d, "home": d / "home", "data_dir": data_dir}[target]
    before = sorted(p.name for p in out.iterdir())
    res = _train(d, base, data_dir / "data.jsonl" if target == "data_dir" else data, "--out", str(out), "--overwrite")
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    assert "refused" in res.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == before
    assert (base / "model.safetensors").is_file() and (d / "home" / "keep").is_file()
