"""The recipe format: every merge writes recipe.yaml; replay.py runs one again.

A recipe names its inputs by registry reference (or path) AND content hash, so a
replay either reads the very same bytes or refuses. It holds no times and no
output path: replaying it writes byte-identical files, recipe.yaml included.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .. import __version__
from ..errors import AdapterHubError

RECIPE_NAME = "recipe.yaml"
RECIPE_VERSION = 1
OPERATIONS = ("merge", "merge_adapters", "extract")


def _tool() -> str:
    return f"adapterhub-local {__version__}"


def merge_recipe(base_dir, inputs, *, dtype, max_shard_size, force, base_fingerprint) -> dict:
    return {
        "adapterhub_recipe": RECIPE_VERSION,
        "tool": _tool(),
        "operation": "merge",
        "method": "linear",
        "formula": "W' = W + sum_i w_i * s_i * B_i @ A_i (float32, one cast)",
        "base": {"path": str(Path(base_dir).resolve()), "fingerprint": base_fingerprint},
        "inputs": [i.to_recipe() for i in inputs],
        "parameters": {"dtype": dtype or "auto", "max_shard_size": str(max_shard_size), "force": bool(force)},
    }


def algebra_recipe(inputs, *, method: str, via: str, params: dict, operation: str = "merge_adapters") -> dict:
    return {
        "adapterhub_recipe": RECIPE_VERSION,
        "tool": _tool(),
        "operation": operation,
        "method": method,
        "via": via,
        "inputs": [i.to_recipe() for i in inputs],
        "parameters": dict(params),
    }


def extract_recipe(base_dir, tuned_dir, *, base_fingerprint, tuned_fingerprint, params: dict) -> dict:
    return {
        "adapterhub_recipe": RECIPE_VERSION,
        "tool": _tool(),
        "operation": "extract",
        "method": "svd",
        "base": {"path": str(Path(base_dir).resolve()), "fingerprint": base_fingerprint},
        "tuned": {"path": str(Path(tuned_dir).resolve()), "fingerprint": tuned_fingerprint},
        "parameters": dict(params),
    }


def dump_recipe(recipe: dict) -> str:
    return yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True, default_flow_style=False, width=120)


def load_recipe(path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / RECIPE_NAME
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise AdapterHubError(f"{path}: cannot read recipe ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise AdapterHubError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or "adapterhub_recipe" not in data:
        raise AdapterHubError(f"{path}: not an adapterhub-local recipe (no adapterhub_recipe key)")
    if data["adapterhub_recipe"] != RECIPE_VERSION:
        raise AdapterHubError(f"{path}: recipe format {data['adapterhub_recipe']} is not supported "
                              f"(this tool reads {RECIPE_VERSION})")
    op = data.get("operation")
    if op not in OPERATIONS:
        raise AdapterHubError(f"{path}: unknown operation {op!r}", f"valid: {', '.join(OPERATIONS)}")
    if op in ("merge", "merge_adapters") and not data.get("inputs"):
        raise AdapterHubError(f"{path}: recipe has no inputs")
    return data
