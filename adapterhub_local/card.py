"""Model cards: the one builder for every README.md adapterhub-local writes.

``adapters train`` (:func:`train_card`), ``merge --into-adapter`` / ``stack`` /
``interpolate`` / ``extract`` (:func:`merge_adapter_card`), ``merge`` into a base
(:func:`merged_model_card`) and ``push`` (:func:`push_card`) all build their card here, on
huggingface_hub's ``ModelCardData`` (the YAML header the Hub indexes) with one tag list
(:func:`tags`) and one body layout (:data:`SECTIONS`, rendered by :func:`render`).

The header:

- ``library_name``: ``peft`` for adapters, ``transformers`` for merged models;
- ``tags``: ``peft`` (adapters), ``lora``, ``adapterhub-local`` (what ``remote list`` and
  the Hub's tag filter find), ``merge`` for merge outputs, and
  ``base_model:adapter:<id>`` for each Hub base of an adapter;
- ``base_model``: Hub ids only, never a local path (the Hub would not resolve it);
- ``base_model_relation``: ``adapter`` / ``merge`` with a ``base_model``. A card written
  beside local files (train, merge) keeps the relation even without a Hub base, since
  it describes what the folder is; a pushed card has it only with a ``base_model``
  (``push`` says so in a hint when the base is a local folder);
- ``eval_results`` (model-index) from registry metrics, on pushed cards.

The body's sections, in order: summary, Provenance, Inputs, Recipe, Lineage, Metrics,
Warnings, Serving, Files, How to use. Every builder takes ``serving=`` (markdown, e.g. a
serving verdict line) and fills the optional "Serving" section with it.

huggingface_hub's card classes cost about half a second to import; they are imported
inside the functions, never at start-up.
"""

from __future__ import annotations

import math
from pathlib import Path

from . import __version__
from .errors import AdapterHubError

TOOL_TAG = "adapterhub-local"
SECTIONS = {  # key -> heading ("" for the untitled summary), in the order they appear
    "summary": "", "provenance": "Provenance", "inputs": "Inputs", "recipe": "Recipe", "lineage": "Lineage",
    "metrics": "Metrics", "warnings": "Warnings", "serving": "Serving", "files": "Files", "usage": "How to use",
}
FOOTER = (f"Published with adapterhub-local {__version__}. `adapterhub.json` in this repo holds "
          "the same provenance in machine-readable form.")


def tags(kind: str, *, merged: bool = False, base_models: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The one tag list: ``kind`` is "adapter" or "merged_model"."""
    out = (["peft"] if kind == "adapter" else []) + ["lora", TOOL_TAG]
    if merged:
        out.append("merge")
    if kind == "adapter":
        out += [f"base_model:adapter:{b}" for b in base_models]
    return out


def hub_bases(*names: str | None) -> list[str]:
    """The Hub ids among ``names`` (paths, local names and None are left out), in order, once."""
    from .repo_id import hub_id_or_none

    out: list[str] = []
    for n in names:
        h = hub_id_or_none(n)
        if h and h not in out:
            out.append(h)
    return out


def card_data(kind: str, *, base_models: list[str] | tuple[str, ...] = (), merged: bool = False,
              local: bool = False, metrics: dict | None = None, model_name: str | None = None):
    """The ModelCardData (YAML header) for any card; see the module docstring for the rules."""
    from huggingface_hub.repocard_data import EvalResult, ModelCardData

    eval_results = []
    for key, value in sorted((metrics or {}).items()):
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
    if (base is not None or local) and (kind == "adapter" or merged):
        kwargs["base_model_relation"] = "adapter" if kind == "adapter" else "merge"
    return ModelCardData(
        base_model=base,
        library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="text-generation",
        tags=tags(kind, merged=merged, base_models=base_models),
        model_name=model_name if eval_results else None,  # model-index needs it
        eval_results=eval_results or None,
        **kwargs,
    )


# --- body pieces ---------------------------------------------------------------------------

def table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        s = "-" if v is None or v == "" else fmt(v)
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def metrics_table(metrics: dict) -> str:
    return table(["Metric", "Value"], [[k, v] for k, v in sorted(metrics.items())]) if metrics else ""


def recipe_block(text: str | None) -> str:
    """A recipe's YAML text (what recipe.yaml holds) as a code block."""
    return "```yaml\n" + text.strip() + "\n```" if text else ""


def warnings_list(warnings) -> str:
    return "\n".join(f"- {w}" for w in warnings or [])


def render_body(title: str, sections: dict[str, str], footer: str | None = None) -> str:
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown card sections: {sorted(unknown)}")
    parts = [f"# {title}"]
    for key, heading in SECTIONS.items():
        text = (sections.get(key) or "").strip()
        if text:
            parts += [f"## {heading}", text] if heading else [text]
    if footer:
        parts += ["---", footer]
    return "\n\n".join(parts) + "\n"


def render(data, title: str, sections: dict[str, str], footer: str | None = None) -> str:
    """The card's text: YAML header, then the sections in :data:`SECTIONS` order."""
    return f"---\n{data.to_yaml()}\n---\n\n{render_body(title, sections, footer)}"


# --- the cards -------------------------------------------------------------------------------

def adapter_card(*, title: str, summary: str, base_model: str | None = None, base_fingerprint: str | None = None,
                 recipe_text: str | None = None, merged: bool = False, metrics: dict | None = None,
                 warnings=(), facts: list[list] | None = None, serving: str | None = None) -> str:
    """The README.md written beside a new adapter (train, merge --into-adapter, extract).

    ``base_model`` is the adapter's base_model_name_or_path (used in the header only when it is
    a Hub id); ``facts`` are extra [name, value] rows of the Provenance table.
    """
    bases = hub_bases(base_model)
    data = card_data("adapter", base_models=bases, merged=merged, local=True)
    rows = [["Base model", f"`{base_model}`" if base_model else "-"],
            ["Base fingerprint", f"`{base_fingerprint}`" if base_fingerprint else "not recorded"], *(facts or []),
            ["Written by", f"adapterhub-local {__version__}"]]
    sections = {"summary": summary, "provenance": table(["", ""], rows), "recipe": recipe_block(recipe_text),
                "metrics": metrics_table(metrics or {}), "warnings": warnings_list(warnings), "serving": serving,
                "usage": _usage(True, bases[0] if bases else base_model, None)}
    return render(data, title, sections)


def merge_adapter_card(*, base_model: str | None, base_fingerprint: str | None, recipe: dict, recipe_text: str,
                       summary: dict, warnings=(), serving: str | None = None) -> str:
    """The README.md of an adapter made by adapter algebra (merge --into-adapter, stack,
    interpolate) or by extract: ``summary`` is the merge report's summary."""
    if recipe.get("operation") == "extract":
        title = "LoRA adapter extracted from a fine-tuned model"
    else:
        title = f"LoRA adapter: {recipe.get('method')} of {len(recipe.get('inputs') or [])} adapter(s)"
    facts = "\n".join(f"- {k}: {summary[k]}" for k in ("exact", "rank", "rel_error", "energy_kept") if k in summary)
    return adapter_card(title=title, summary=facts, base_model=base_model, base_fingerprint=base_fingerprint,
                        recipe_text=recipe_text, merged=True, warnings=warnings, serving=serving)


def merged_model_card(config: dict | None, base_dir, inputs, recipe_text: str, warnings=(),
                      base_fingerprint: str | None = None, serving: str | None = None) -> str:
    """The README.md of a merge into a base: ``config`` is the base's config.json, ``inputs``
    the merge's MergeInputs."""
    base_name = str((config or {}).get("_name_or_path") or Path(base_dir).resolve().name)
    bases = hub_bases(base_name)
    data = card_data("merged_model", base_models=bases, merged=True, local=True)
    title = f"{base_name} + {len(inputs)} LoRA adapter(s), merged"
    summary = ("Merged by adapterhub-local: W' = W + Σ wᵢ·sᵢ·Bᵢ·Aᵢ, computed in float32 and cast once "
               "(sᵢ = alpha/r, or alpha/√r with rsLoRA).")
    rows = [["Base model", f"`{base_name}`"],
            ["Base fingerprint", f"`{base_fingerprint}`" if base_fingerprint else "not recorded"],
            ["Written by", f"adapterhub-local {__version__}"]]
    inputs_rows = [[f"`{i.ref}`", f"{i.weight:g}", ",".join(map(str, i.adapter.ranks)), len(i.adapter.modules),
                    f"`{i.base_fingerprint or 'unknown'}`"] for i in inputs]
    sections = {
        "summary": summary, "provenance": table(["", ""], rows),
        "inputs": table(["adapter", "weight", "ranks", "modules", "expected base"], inputs_rows),
        "recipe": "Replay with `adapters merge --recipe recipe.yaml --out DIR`.\n\n" + recipe_block(recipe_text),
        "warnings": warnings_list(warnings), "serving": serving, "usage": _usage(False, None, None),
    }
    return render(data, title, sections)


def _usage(is_adapter: bool, base_ref: str | None, repo_id: str | None) -> str:
    where = repo_id or "path/to/this/folder"
    if is_adapter:
        text = ("```python\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n\n"
                f"base = AutoModelForCausalLM.from_pretrained(\"{base_ref or 'BASE_MODEL'}\")\n"
                f"model = PeftModel.from_pretrained(base, \"{where}\")\n```")
        return text + (f"\n\nOr into a local registry: `adapters pull {repo_id}`." if repo_id else "")
    return ("```python\nfrom transformers import AutoModelForCausalLM\n\n"
            f"model = AutoModelForCausalLM.from_pretrained(\"{where}\")\n```")


def train_card(cfg, metrics: dict, base: Path, world: int, base_model: str | None = None,
               serving: str | None = None) -> str:
    """The README.md `adapters train` writes beside the adapter. ``cfg`` is the TrainConfig;
    ``base_model`` the adapter's base_model_name_or_path (default: the base folder)."""
    summary = (f"LoRA adapter trained with `adapters train` on `{Path(cfg.data).name}` "
               f"(r={cfg.rank}, alpha={cfg.alpha:g}, targets={','.join(cfg.targets)}, lr={cfg.lr:g}, "
               f"{cfg.schedule} schedule, {metrics.get('steps')} steps, world size {world}).")
    return adapter_card(title=str(cfg.name or Path(cfg.out_dir).name), summary=summary,
                        base_model=base_model or str(base), metrics=metrics, serving=serving)


# --- push: a card for what is being published --------------------------------------------------

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


def push_sections(src, prov: dict, repo_id: str, base_models: list[str], serving: str | None = None) -> dict:
    """The human sections of a pushed card, by name (a user template can place them)."""
    from .progress import human_bytes

    record = src.record
    base_label = ", ".join(f"[{b}](https://huggingface.co/{b})" for b in base_models) if base_models else (
        f"`{src.base_name}`" if src.base_name else "an unrecorded base model")
    inputs = prov["lineage"].get("inputs") or []
    if src.is_adapter:
        s = src.adapter_summary or {}
        ranks = s.get("ranks") or [s.get("r")]
        rank = ranks[0] if len(ranks) == 1 else "/".join(str(r) for r in ranks)
        what = (f"A LoRA adapter (rank {rank}, alpha {s.get('lora_alpha')}, "
                f"{s.get('trainable_parameters', 0):,} parameters on {', '.join(s.get('targets') or [])}) "
                f"for {base_label}.")
    elif src.recipe is not None:
        merged = ", ".join(f"`{i.get('ref')}`" + (f" (w={i['weight']})" if i.get("weight") is not None else "")
                           for i in inputs) or "LoRA adapters"
        what = f"A merged model: {base_label} with {merged} merged into its weights (W' = W + Σ wᵢ·sᵢ·BᵢAᵢ)."
    else:
        what = f"A model derived from {base_label} (no merge recipe was found beside it)."

    facts = [["Base model", src.base_name or "-"], ["Base fingerprint", f"`{src.base_fingerprint}`"
                                                    if src.base_fingerprint else "not recorded"]]
    if not src.is_adapter and src.model_fingerprint:
        facts.append(["Fingerprint of these weights", f"`{src.model_fingerprint}`"])
    if record is not None:
        facts.append(["Registry version", f"`{getattr(record, 'ref', None) or record.name}`"])
        if getattr(record, "created_at", None):
            facts.append(["Registered", str(record.created_at)])
    facts.append(["Published with", f"adapterhub-local {__version__}"])

    recipe_parts = []
    if src.recipe:
        if src.recipe.get("method"):
            recipe_parts.append(f"Method: `{src.recipe.get('method')}`")
        if inputs:
            rows = [[f"`{i.get('ref')}`", i.get("version") or _version_of(i.get("ref")), i.get("weight"),
                     f"`{_short(_content_hash(i))}`"] for i in inputs]
            recipe_parts.append(table(["Input", "Version", "Weight", "Content hash"], rows))
        if src.recipe_text is None:
            import yaml

            recipe_parts.append(recipe_block(yaml.safe_dump(src.recipe, sort_keys=False)))
        else:
            recipe_parts.append(recipe_block(src.recipe_text))
    parents = prov["lineage"].get("parents") or []
    metrics = prov.get("metrics") or {}
    file_rows = [[f"`{name}`", human_bytes(src.sizes.get(name, 0)), f"`{sha}`"]
                 for name, sha in sorted(src.files.items())]
    return {
        "summary": what, "provenance": table(["", ""], facts), "recipe": "\n\n".join(recipe_parts),
        "lineage": "Parents: " + ", ".join(f"`{p}`" for p in parents) if parents else "",
        "metrics": "From the adapterhub-local registry.\n\n" + metrics_table(metrics) if metrics else "",
        "serving": serving or "", "files": table(["File", "Size", "sha256"], file_rows),
        "usage": _usage(src.is_adapter, base_models[0] if base_models else (src.base_name or "BASE_MODEL"), repo_id),
    }


def push_card(src, prov: dict, repo_id: str, base_models: list[str], template: str | Path | None = None,
              serving: str | None = None) -> str:
    """The README.md a push uploads; ``template`` is a user README (Jinja variables:
    card_data, repo_id, model_name, base_model, base_fingerprint, adapterhub, details, and
    each section by name). Without a template, only ModelCardData is imported (ModelCard
    pulls in all of huggingface_hub's API client: ~0.4 s of a dry run's start-up)."""
    name = repo_id.split("/", 1)[1]
    data = card_data("adapter" if src.is_adapter else "merged_model", base_models=base_models,
                     merged=src.recipe is not None, metrics=prov.get("metrics"), model_name=name)
    sections = push_sections(src, prov, repo_id, base_models, serving)
    if template is None:
        return render(data, name, sections, FOOTER)

    from huggingface_hub import ModelCard

    template = Path(template)
    try:
        text = template.read_text(encoding="utf-8")
    except OSError as e:
        raise AdapterHubError(f"{template}: cannot read the card template ({e.strerror})") from None
    import jinja2

    try:
        rendered = jinja2.Template(text).render(
            card_data=data.to_yaml(), repo_id=repo_id, model_name=name, base_model=base_models,
            base_fingerprint=src.base_fingerprint, adapterhub=prov, details=render_body(name, sections, FOOTER),
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
    return str(ModelCard(f"---\n{card.data.to_yaml()}\n---\n{card.text}"))


__all__ = ["SECTIONS", "TOOL_TAG", "adapter_card", "card_data", "hub_bases", "merged_model_card", "push_card",
           "push_sections", "render", "tags", "train_card", "merge_adapter_card"]
