"""Replay a recipe: `adapters merge --recipe recipe.yaml` runs the same operation again.

The format lives in recipe.py, which the operations import to write their recipe;
this module sits above them (it calls algebra, base and extract), so no cycle.
"""

from __future__ import annotations

from ..errors import AdapterHubError


def replay(recipe: dict, out, *, overwrite: bool = False, registry_home=None, base_dir=None,
           progress: bool = True):
    """Run a recipe again. Inputs are resolved by reference and checked against their hashes."""
    from .inputs import check_hashes, resolve_input

    op = recipe["operation"]
    params = recipe.get("parameters") or {}
    if base_dir is not None and op == "merge_adapters":
        raise AdapterHubError("this recipe combines adapters; it has no base model to replace")
    if op == "extract":
        from .extract import extract_lora

        return extract_lora(base_dir or recipe["base"]["path"], recipe["tuned"]["path"], out,
                            rank=params.get("rank"), energy=params.get("energy"),
                            seed=params.get("seed", 0), overwrite=overwrite, progress=progress,
                            expect={"base": recipe["base"].get("fingerprint"),
                                    "tuned": recipe["tuned"].get("fingerprint")})
    inputs = []
    for item in recipe["inputs"]:
        inp = resolve_input(item["ref"], float(item.get("weight", 1.0)), registry_home)
        check_hashes(inp, item.get("sha256") or {})
        inputs.append(inp)
    if op == "merge":
        from .base import merge_into_base

        base = base_dir or recipe["base"]["path"]
        return merge_into_base(base, inputs, out, dtype=params.get("dtype", "auto"),
                               max_shard_size=params.get("max_shard_size", "5GB"),
                               force=bool(params.get("force")), overwrite=overwrite, progress=progress,
                               expect_base=(recipe.get("base") or {}).get("fingerprint"))
    from .algebra import merge_adapters

    return merge_adapters(inputs, out, method=recipe["method"], rank=params.get("rank"),
                          density=params.get("density"), seed=params.get("seed", 0),
                          overwrite=overwrite, operation=recipe.get("operation_name") or params.get("verb"),
                          extra_params=params)
