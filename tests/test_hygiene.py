"""Project hygiene: every third-party module the code imports is a declared dependency, and
package-data names only files that exist."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ["adapterhub_local", "trainer", "registry"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_modules() -> dict[str, str]:
    """{top-level module: first file importing it}, every import in the package, nested ones too."""
    found: dict[str, str] = {}
    for folder in CODE:
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for n in names:
                    found.setdefault(n.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_norm(re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0]) for d in project["dependencies"]}
    for extra in project.get("optional-dependencies", {}).values():
        declared |= {_norm(re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0]) for d in extra}
    dists = md.packages_distributions()
    ours = {"adapterhub_local"}
    missing = []
    for mod, where in sorted(_imported_top_modules().items()):
        if mod in sys.stdlib_module_names or mod in ours or mod.startswith("_"):
            continue
        owners = {_norm(d) for d in dists.get(mod, [])}
        if not owners:
            missing.append(f"{mod} (imported in {where}) is not installed at all")
        elif not owners & declared:
            missing.append(f"{mod} (imported in {where}) comes from {sorted(owners)}, not declared")
    assert not missing, "\n".join(missing)


def test_package_data_names_only_what_exists():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text()).get("tool", {}).get("setuptools", {})
    dirs = tool.get("package-dir", {})
    for pkg, patterns in tool.get("package-data", {}).items():
        base = ROOT / dirs.get(pkg, pkg.replace(".", "/"))
        for pattern in patterns:
            assert list(base.glob(pattern)), f"package-data {pkg}: {pattern} matches no file"
