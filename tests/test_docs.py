"""The manual: the generated CLI reference is current, every command teaches with an example,
the site builds in strict mode, and the README stays a tour."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    from adapterhub_local.cli.reference import render

    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert committed == render(), "docs/cli.md is stale: run `make cli-docs` and commit it"


def test_every_command_has_an_example_and_every_flag_is_in_the_reference():
    from adapterhub_local.cli.reference import commands, render

    page = render()
    import click

    for path, cmd in commands():
        if isinstance(cmd, click.Group):
            continue
        assert re.search(r"Examples?:", cmd.help or ""), f"`{path} --help` has no Example: block"
        assert f"## `{path}`" in page
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.hidden:
                assert f"`{p.opts[0]}`" in page, f"{path} {p.opts[0]} missing from the reference"


def test_every_page_is_in_the_navigation_and_links_resolve():
    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = {next(iter(item.values())) for item in cfg["nav"]}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages == nav, f"pages not in nav: {pages - nav}; nav entries without a page: {nav - pages}"
    for page in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).is_file(), f"{page.name} links to missing {target}"


def test_readme_is_a_tour_not_the_manual():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 400
    for page in ("docs/index.md", "benchmarks/RESULTS.md"):
        assert page in readme or page.removeprefix("docs/") in readme


def test_site_builds_offline_in_strict_mode(tmp_path):
    mkdocs = shutil.which("mkdocs") or str(Path(os.sys.executable).parent / "mkdocs")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "site" / "cli" / "index.html").is_file()
