"""Model cards built with huggingface_hub's ModelCard / ModelCardData.

The YAML header carries what the Hub indexes: base_model (+ base_model_relation),
library_name, tags and the registry's metrics as model-index eval results. The body
is for people: what this is, the recipe, the inputs with versions and content hashes,
the base fingerprint, the files, and how to load it.
"""

from __future__ import annotations

import math
from pathlib import Path

from .. import __version__
from ..errors import AdapterHubError

TOOL_TAG = "adapterhub-local"


def _human(n: int) -> str:
    from ..cli.output import human_bytes

    return human_bytes(n)


def _short(h: str | None, n: int = 16) -> str:
    if not h:
        return "-"
    return h if len(h) <= n + 7 else h[: n + (7 if h.startswith("sha256:") else 0)] + "…"


def _version_of(ref) -> str | None:
    if isinstance(ref, str) and "@" in ref and ref.rsplit("@", 1)[1].isdigit():
        return ref.rsplit("@", 1)[1]
    return None


def _content_hash(item: dict) -> str | None:
    """An input's content hash: its weights file's sha256 when the recipe lists every file."""
    h = item.get("sha256") or item.get("content_hash") or item.get("fingerprint")
    if isinstance(h, dict):
        return h.get("adapter_model.safetensors") or next(iter(h.values()), None)
    return h if isinstance(h, str) else None


def card_data(src, prov: dict, repo_id: str, base_models: list[str]):
    """The ModelCardData for a Source."""
    from huggingface_hub import EvalResult, ModelCardData

    tags = ["lora", TOOL_TAG]
    if src.is_adapter:
        tags.insert(0, "peft")
        tags += [f"base_model:adapter:{b}" for b in base_models]
    if src.recipe is not None:
        tags.append("merge")
    eval_results = []
    for key, value in sorted((prov.get("metrics") or {}).items()):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        split = key.split("_", 1)[0] if "_" in key else "eval"
        eval_results.append(EvalResult(
            task_type="text-generation", dataset_type="adapterhub-local-registry",
            dataset_name="registry metrics", dataset_split=split, metric_type=key, metric_value=value,
            metric_name=key,
        ))
    base = None
    if base_models:
        base = base_models[0] if len(base_models) == 1 else list(base_models)
    kwargs = {}
    if base is not None and (src.is_adapter or src.recipe is not None):
        kwargs["base_model_relation"] = "adapter" if src.is_adapter else "merge"
    return ModelCardData(
        base_model=base,
        library_name="peft" if src.is_adapter else "transformers",
        pipeline_tag="text-generation",
        tags=tags,
        model_name=repo_id.split("/", 1)[1] if eval_results else None,  # model-index needs it
        eval_results=eval_results or None,
        **kwargs,
    )


def _table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        s = "-" if v is None or v == "" else str(v)
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def body_sections(src, prov: dict, repo_id: str, base_models: list[str]) -> dict[str, str]:
    """The human sections, by name, so a user template can place them."""
    record = src.record
    sections: dict[str, str] = {}
    base_label = ", ".join(f"[{b}](https://huggingface.co/{b})" for b in base_models) if base_models else (
        f"`{src.base_name}`" if src.base_name else "an unrecorded base model")
    if src.is_adapter:
        s = src.adapter_summary or {}
        ranks = s.get("ranks") or [s.get("r")]
        rank = ranks[0] if len(ranks) == 1 else "/".join(str(r) for r in ranks)
        what = (f"A LoRA adapter (rank {rank}, alpha {s.get('lora_alpha')}, "
                f"{s.get('trainable_parameters', 0):,} parameters on {', '.join(s.get('targets') or [])}) "
                f"for {base_label}.")
    elif src.recipe is not None:
        merged = ", ".join(f"`{i.get('ref')}`" + (f" (w={i['weight']})" if i.get("weight") is not None else "")
                           for i in prov["lineage"].get("inputs") or []) or "LoRA adapters"
        what = f"A merged model: {base_label} with {merged} merged into its weights (W' = W + Σ wᵢ·sᵢ·BᵢAᵢ)."
    else:
        what = f"A model derived from {base_label} (no merge recipe was found beside it)."
    sections["summary"] = what

    facts = [["Base model", src.base_name or "-"], ["Base fingerprint", f"`{src.base_fingerprint}`"
                                                    if src.base_fingerprint else "not recorded"]]
    if not src.is_adapter and src.model_fingerprint:
        facts.append(["Fingerprint of these weights", f"`{src.model_fingerprint}`"])
    if record is not None:
        facts.append(["Registry version", f"`{getattr(record, 'ref', None) or record.name}`"])
        if getattr(record, "created_at", None):
            facts.append(["Registered", str(record.created_at)])
    facts.append(["Published with", f"adapterhub-local {__version__}"])
    sections["provenance"] = _table(["", ""], facts)

    inputs = prov["lineage"].get("inputs") or []
    recipe_parts = []
    if src.recipe:
        method = src.recipe.get("method")
        if method:
            recipe_parts.append(f"Method: `{method}`")
        if inputs:
            rows = [[f"`{i.get('ref')}`", i.get("version") or _version_of(i.get("ref")), i.get("weight"),
                     f"`{_short(_content_hash(i))}`"] for i in inputs]
            recipe_parts.append(_table(["Input", "Version", "Weight", "Content hash"], rows))
        if src.recipe_text:
            recipe_parts.append("```yaml\n" + src.recipe_text.strip() + "\n```")
        else:
            import yaml

            recipe_parts.append("```yaml\n" + yaml.safe_dump(src.recipe, sort_keys=False).strip() + "\n```")
    sections["recipe"] = "\n\n".join(recipe_parts)

    lineage = []
    parents = prov["lineage"].get("parents") or []
    if parents:
        lineage.append("Parents: " + ", ".join(f"`{p}`" for p in parents))
    sections["lineage"] = "\n".join(lineage)

    metrics = prov.get("metrics") or {}
    sections["metrics"] = _table(["Metric", "Value"], [[k, v] for k, v in sorted(metrics.items())]) if metrics else ""

    file_rows = [[f"`{name}`", _human(src.sizes.get(name, 0)), f"`{sha}`"] for name, sha in sorted(src.files.items())]
    sections["files"] = _table(["File", "Size", "sha256"], file_rows)

    if src.is_adapter:
        base_ref = base_models[0] if base_models else (src.base_name or "BASE_MODEL")
        sections["usage"] = (
            "```python\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n\n"
            f"base = AutoModelForCausalLM.from_pretrained(\"{base_ref}\")\n"
            f"model = PeftModel.from_pretrained(base, \"{repo_id}\")\n```\n\n"
            f"Or into a local registry: `adapters pull {repo_id}`."
        )
    else:
        sections["usage"] = (
            "```python\nfrom transformers import AutoModelForCausalLM\n\n"
            f"model = AutoModelForCausalLM.from_pretrained(\"{repo_id}\")\n```"
        )
    return sections


def render_body(name: str, sections: dict[str, str]) -> str:
    parts = [f"# {name}", sections["summary"], "## Provenance", sections["provenance"]]
    if sections.get("recipe"):
        parts += ["## Recipe", sections["recipe"]]
    if sections.get("lineage"):
        parts += ["## Lineage", sections["lineage"]]
    if sections.get("metrics"):
        parts += ["## Metrics", "From the adapterhub-local registry.", sections["metrics"]]
    parts += ["## Files", sections["files"], "## How to use", sections["usage"],
              "---", (f"Published with adapterhub-local {__version__}. `adapterhub.json` in this repo holds "
                      "the same provenance in machine-readable form.")]
    return "\n\n".join(parts) + "\n"


def build_card(src, prov: dict, repo_id: str, base_models: list[str], template: str | Path | None = None):
    """A huggingface_hub ModelCard; ``template`` is a user README (Jinja variables allowed)."""
    from huggingface_hub import ModelCard

    data = card_data(src, prov, repo_id, base_models)
    sections = body_sections(src, prov, repo_id, base_models)
    name = repo_id.split("/", 1)[1]
    if template is None:
        return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{render_body(name, sections)}", ignore_metadata_errors=False)

    template = Path(template)
    try:
        text = template.read_text(encoding="utf-8")
    except OSError as e:
        raise AdapterHubError(f"{template}: cannot read the card template ({e.strerror})") from None
    import jinja2

    try:
        rendered = jinja2.Template(text).render(
            card_data=data.to_yaml(), repo_id=repo_id, model_name=name, base_model=base_models,
            base_fingerprint=src.base_fingerprint, adapterhub=prov, details=render_body(name, sections),
            **sections,
        )
    except jinja2.TemplateError as e:
        raise AdapterHubError(f"{template}: template error ({e})") from None
    try:
        card = ModelCard(rendered) if rendered.lstrip().startswith("---") else ModelCard(
            f"---\n{data.to_yaml()}\n---\n\n{rendered}")
    except ValueError as e:
        raise AdapterHubError(f"{template}: bad YAML header ({str(e).splitlines()[0]})") from None
    # the template's own metadata wins; ours fills in what it does not set
    for key, value in data.to_dict().items():
        if key == "model-index":
            continue
        if card.data.get(key) in (None, [], "") and value not in (None, [], ""):
            card.data[key] = value
    if data.eval_results and not card.data.get("eval_results"):
        card.data.eval_results = data.eval_results
        card.data.model_name = data.model_name
    return ModelCard(f"---\n{card.data.to_yaml()}\n---\n{card.text}")
