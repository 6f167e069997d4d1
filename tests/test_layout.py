"""Packaging and start-up: our namespace only, a fast CLI, every verb documented."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent


def _py(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd="/").stdout.strip()


def test_no_bare_trainer_or_registry_module_is_imported():
    out = _py(
        "import sys, adapterhub_local.cli, adapterhub_local.trainer, adapterhub_local.registry;"
        "import adapterhub_local.trainer as t, adapterhub_local.registry as r;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('trainer', 'registry')));"
        "print(t.__file__); print(r.__file__)"
    )
    lines = out.splitlines()
    assert lines[0] == "[]"
    assert lines[1].endswith("trainer/__init__.py") and "adapterhub_local" not in lines[1].split("/")[-2]
    assert lines[2].endswith("registry/__init__.py")


def test_cli_startup_imports_no_heavy_library():
    out = _py(
        "import sys, adapterhub_local.cli;"
        "print(sorted(m for m in ('torch', 'transformers', 'huggingface_hub', 'peft', 'safetensors')"
        " if m in sys.modules))"
    )
    assert out == "[]"


def _all_commands():
    from adapterhub_local.cli import cli

    return cli.commands


def test_every_command_has_help_and_appears_in_readme():
    readme = (ROOT / "README.md").read_text()
    for name, cmd in _all_commands().items():
        assert cmd.help and len(cmd.help.strip()) > 20, f"`adapters {name}` needs help text"
        for param in cmd.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert param.help, f"`adapters {name} {param.opts[0]}` needs help text"
        assert re.search(rf"adapters {re.escape(name)}\b", readme), f"README lacks `adapters {name}`"


def test_readme_commands_and_ci():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_a_normal_wheel_install_maps_trainer_and_registry(tmp_path):
    """Editable installs are what we test with; a plain wheel must import the same way."""
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next(wheel_dir.glob("adapterhub_local-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import adapterhub_local.trainer as t, adapterhub_local.registry as r, adapterhub_local.cli;"
            "print(t.__file__); print(r.__file__)")
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
                         capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    paths = out.stdout.split()
    assert paths[0].startswith(str(target)) and paths[0].endswith("adapterhub_local/trainer/__init__.py")
    assert paths[1].startswith(str(target)) and paths[1].endswith("adapterhub_local/registry/__init__.py")
