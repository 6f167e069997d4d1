"""Model cards (README.md) for merge outputs: YAML front matter the Hub reads, then the recipe."""

from __future__ import annotations

from pathlib import Path

import yaml

from .recipe import dump_recipe


def _front(meta: dict) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _base_name(config: dict, base_dir) -> str:
    name = (config or {}).get("_name_or_path")
    return str(name) if name else Path(base_dir).resolve().name


def merged_model_card(config: dict, base_dir, inputs, recipe: dict, warnings: list[str], fingerprint: str) -> str:
    base = _base_name(config, base_dir)
    meta = {"base_model": base, "base_model_relation": "merge", "library_name": "transformers",
            "tags": ["merge", "lora", "adapterhub-local"]}
    lines = [_front(meta), f"# {base} + {len(inputs)} LoRA adapter(s), merged", "",
             ("Merged by adapterhub-local: W' = W + Σ wᵢ·sᵢ·Bᵢ·Aᵢ, computed in float32 and cast once "
              "(sᵢ = alpha/r, or alpha/√r with rsLoRA)."), "",
             f"Base model fingerprint: `{fingerprint}`", "",
             "| adapter | weight | ranks | modules | expected base |", "|---|---|---|---|---|"]
    for i in inputs:
        fp = i.base_fingerprint or "unknown"
        lines.append(f"| `{i.ref}` | {i.weight:g} | {','.join(map(str, i.adapter.ranks))} | "
                     f"{len(i.adapter.modules)} | `{fp}` |")
    lines.append("")
    if warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    lines += ["## Recipe", "", "Replay with `adapters merge --recipe recipe.yaml --out DIR`.", "",
              "```yaml", dump_recipe(recipe).rstrip(), "```", ""]
    return "\n".join(lines)


def adapter_card(base_model: str | None, recipe: dict, summary: dict, warnings: list[str]) -> str:
    meta = {"library_name": "peft", "base_model_relation": "adapter",
            "tags": ["lora", "merge", "adapterhub-local"]}
    if base_model:
        meta = {"base_model": base_model, **meta}
        meta["tags"].append(f"base_model:adapter:{base_model}")
    if recipe.get("operation") == "extract":
        title = "# LoRA adapter extracted from a fine-tuned model"
    else:
        title = f"# LoRA adapter: {recipe.get('method')} of {len(recipe.get('inputs') or [])} adapter(s)"
    lines = [_front(meta), title, ""]
    for key in ("exact", "rank", "rel_error", "energy_kept"):
        if key in summary:
            lines.append(f"- {key}: {summary[key]}")
    lines.append("")
    if warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    lines += ["## Recipe", "", "```yaml", dump_recipe(recipe).rstrip(), "```", ""]
    return "\n".join(lines)
