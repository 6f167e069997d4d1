"""The merge engine: streaming merges into base models, adapter algebra, extraction, recipes.

    from adapterhub_local.merge import merge_into_base, merge_adapters, resolve_inputs
    inputs = resolve_inputs(["support@3", "./legal"], weights=[0.7, 0.3])
    report = merge_into_base("./base", inputs, "./merged")        # W' = W + Σ wᵢ·sᵢ·BᵢAᵢ
    report = merge_adapters(inputs, "./combo", method="cat")      # exact, rank Σrᵢ
"""

from __future__ import annotations

from .inputs import MergeInput, parse_weights, resolve_input, resolve_inputs

__all__ = [
    "METHODS",
    "MergeInput",
    "extract_lora",
    "interpolate",
    "load_recipe",
    "merge_adapters",
    "merge_into_base",
    "parse_weights",
    "replay",
    "resolve_input",
    "resolve_inputs",
    "stack",
]


def __getattr__(name):  # keep `import adapterhub_local.merge` cheap: torch loads on first use
    if name == "merge_into_base":
        from .base import merge_into_base

        return merge_into_base
    if name in ("merge_adapters", "interpolate", "stack"):
        from . import algebra

        return getattr(algebra, name)
    if name == "extract_lora":
        from .extract import extract_lora

        return extract_lora
    if name == "load_recipe":
        from .recipe import load_recipe

        return load_recipe
    if name == "replay":
        from .replay import replay

        return replay
    if name == "METHODS":
        from .methods import METHODS

        return METHODS
    raise AttributeError(name)
