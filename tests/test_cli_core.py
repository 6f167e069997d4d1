"""`adapters inspect` / `fingerprint`, and every bad input: one line, exit 1, no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tiny import make_peft_adapter

from adapterhub_local.cli import cli, main


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory, llama_dir):
    return make_peft_adapter(llama_dir, tmp_path_factory.mktemp("good") / "ad", r=4, lora_alpha=8)


def run_main(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def assert_one_line_error(code, err, *needles):
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(folder, fn):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(folder, fn):
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


def _a_key(tensors):
    return next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))


BAD_CASES = {
    "missing_config": (lambda d: (d / "adapter_config.json").unlink(), ["no adapter_config.json"]),
    "missing_weights": (lambda d: (d / "adapter_model.safetensors").unlink(), ["no adapter_model.safetensors"]),
    "truncated": (
        lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:-100]),
        ["adapter_model.safetensors", "truncated or corrupt"],
    ),
    "garbage": (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 64), ["truncated or corrupt"]),
    "config_not_json": (lambda d: (d / "adapter_config.json").write_text("{r: 4"),
                        ["adapter_config.json", "not valid JSON"]),
    "a_without_b": (
        lambda d: _edit_tensors(d, lambda t: t.pop(_a_key(t).replace("lora_A", "lora_B"))),
        ["has lora_A but no lora_B"],
    ),
    "shape_vs_r": (lambda d: _edit_config(d, lambda c: c.update(r=5)), ["disagree with r=5"]),
    "shape_vs_rank_pattern": (
        lambda d: _edit_config(d, lambda c: c.update(rank_pattern={"v_proj": 2})),
        ["v_proj", "disagree with r=2", "rank_pattern"],
    ),
    "non_finite": (
        lambda d: _edit_tensors(d, lambda t: t[_a_key(t)].view(-1).__setitem__(0, float("nan"))),
        ["non-finite"],
    ),
    "unknown_peft_type": (lambda d: _edit_config(d, lambda c: c.update(peft_type="IA3")), ["unknown peft_type 'IA3'"]),
    "pickled_bin": (
        lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"),
        ["adapter_model.bin", "pickled", "safe_serialization=True"],
    ),
    # DoRA is read now (tests/test_variants_dora.py); a DoRA config without its magnitudes is not
    "dora": (lambda d: _edit_config(d, lambda c: c.update(use_dora=True)), ["DoRA", "lora_magnitude_vector"]),
    "not_a_dir": (lambda d: shutil.rmtree(d), ["no such file or directory"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_adapter_gives_one_clear_line(case, good_adapter, tmp_path, capsys):
    folder = _copy(good_adapter, tmp_path / "bad")
    spoil, needles = BAD_CASES[case]
    spoil(folder)
    code, out, err = run_main(["inspect", str(folder)], capsys)
    assert_one_line_error(code, err, str(folder) if case != "missing_config" else "bad", *needles)
    assert out == ""


def test_debug_shows_the_traceback(tmp_path):
    from adapterhub_local.errors import InvalidAdapter

    with pytest.raises(InvalidAdapter):
        main(["inspect", str(tmp_path / "nope"), "--debug"])


def test_bad_model_dir_for_fingerprint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_main(["fingerprint", str(tmp_path / "empty")], capsys)
    assert_one_line_error(code, err, "no *.safetensors")
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "pytorch_model.bin").write_bytes(b"x")
    code, _, err = run_main(["fingerprint", str(tmp_path / "pt")], capsys)
    assert_one_line_error(code, err, "pickled")
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "model.safetensors").write_bytes(b"\x10\x00")
    code, _, err = run_main(["fingerprint", str(tmp_path / "trunc")], capsys)
    assert_one_line_error(code, err, "truncated or corrupt")


def test_inspect_human_and_json(good_adapter):
    runner = CliRunner()
    res = runner.invoke(cli, ["inspect", str(good_adapter)], catch_exceptions=False)
    assert res.exit_code == 0
    assert "trainable params" in res.output and "q_proj" in res.output
    res = runner.invoke(cli, ["inspect", str(good_adapter), "--json"], catch_exceptions=False)
    data = json.loads(res.output)
    assert data["ranks"] == [4] and data["scalings"] == [2.0]
    assert data["targets"] == ["q_proj", "v_proj"]
    assert all(m["delta_norm"] > 0 for m in data["modules"])
    assert data["num_modules"] == 4


def test_fingerprint_cli_json_and_cache(llama_dir):
    runner = CliRunner()
    first = json.loads(runner.invoke(cli, ["fingerprint", str(llama_dir), "--json"],
                                     catch_exceptions=False).output)
    second = json.loads(runner.invoke(cli, ["fingerprint", str(llama_dir), "--json"],
                                      catch_exceptions=False).output)
    assert first["fingerprint"].startswith("sha256:") and first["fingerprint"] == second["fingerprint"]
    assert second["cached"] is True
    human = runner.invoke(cli, ["fingerprint", str(llama_dir)], catch_exceptions=False).output
    assert first["fingerprint"] in human and "model.safetensors" in human


def test_usage_error_exits_2(capsys):
    code, _, err = run_main(["inspect"], capsys)
    assert code == 2 and "Missing argument" in err


def test_version_and_help():
    runner = CliRunner()
    assert "adapters, version" in runner.invoke(cli, ["--version"]).output
    res = runner.invoke(cli, ["-h"])
    assert res.exit_code == 0 and "inspect" in res.output


def test_console_script_error_path_in_a_real_process(tmp_path):
    exe = shutil.which("adapters", path=str(__import__("pathlib").Path(sys.executable).parent))
    proc = subprocess.run([exe, "inspect", str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_dora_can_be_read_when_asked(llama_dir, tmp_path):
    from adapterhub_local.peft_format import load_adapter

    folder = make_peft_adapter(llama_dir, tmp_path / "d", use_dora=True)  # with its magnitude vectors
    assert load_adapter(folder, allow_dora=True).modules
    assert all(m.magnitude is not None for m in load_adapter(folder).modules.values())
