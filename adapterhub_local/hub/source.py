"""What is being pushed: a PEFT adapter (folder or registry ref) or a merged model folder.

``resolve_source`` looks at REF_OR_DIR once and gathers everything the card and the
provenance file need: the kind, the folder, the registry record, the merge recipe,
per-file sha256 and the base model's identity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AdapterHubError, InvalidModel
from ..repo_id import hub_id_or_none  # noqa: F401 - push imports it from here

RECIPE_NAMES = ("recipe.yaml", "recipe.yml")
# Files a push never carries: our own outputs are regenerated, caches and temp files are noise.
SKIP_NAMES = {"README.md", "adapterhub.json", "provenance.json", ".gitattributes"}
SKIP_PREFIXES = (".",)


@dataclass
class Source:
    kind: str  # "adapter" | "merged"
    folder: Path
    ref: str  # what the user typed
    record: object | None = None  # registry VersionRecord for registry refs
    recipe: dict | None = None
    recipe_text: str | None = None
    config: dict = field(default_factory=dict)  # adapter_config.json or config.json
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    sizes: dict[str, int] = field(default_factory=dict)
    base_fingerprint: str | None = None
    base_name: str | None = None  # base model path or Hub id as recorded
    model_fingerprint: str | None = None  # merged models: the fingerprint of the published weights
    adapter_summary: dict | None = None
    existing_readme: str | None = None
    local_provenance: dict = field(default_factory=dict)  # the folder's own adapterhub.json / provenance.json

    @property
    def is_adapter(self) -> bool:
        return self.kind == "adapter"


# Trainer leftovers that never belong in a published repo (and pickles we refuse to ship).
LEFTOVERS = ("optimizer.pt", "scheduler.pt", "training_args.bin", "trainer_state.json", "adapter_model.bin")


def _skip(name: str) -> bool:
    return (name in SKIP_NAMES or name in LEFTOVERS or name.startswith(SKIP_PREFIXES)
            or name.endswith((".tmp", ".partial")) or (name.startswith("rng_state") and name.endswith(".pth")))


def payload_files(folder: Path, recursive: bool = True) -> list[Path]:
    """The files of ``folder`` a push uploads, in a stable order. Adapters are their
    top-level files (checkpoint-*/ subfolders are training state); model folders may nest."""
    from ..fsutil import regular_files

    # lstat-based: a symlink, FIFO or device anywhere in what a push would read is refused by name
    files = regular_files(folder, recursive=recursive, what="folder to push")
    return [p for p in files if not _skip(p.name) and p.relative_to(folder).as_posix() not in SKIP_NAMES]


def _hash_files(folder: Path, known: dict[str, str] | None = None,
                recursive: bool = True) -> tuple[dict[str, str], dict[str, int]]:
    from ..fingerprint import file_sha256

    hashes, sizes = {}, {}
    for path in payload_files(folder, recursive):
        rel = path.relative_to(folder).as_posix()
        sizes[rel] = path.stat().st_size
        hashes[rel] = (known or {}).get(rel) or file_sha256(path)
    return hashes, sizes


def _read_recipe(folder: Path) -> tuple[dict | None, str | None]:
    for name in RECIPE_NAMES:
        path = folder / name
        if path.is_file():
            import yaml  # here: most folders have no recipe

            text = path.read_text(encoding="utf-8")
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise AdapterHubError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
            if data is not None and not isinstance(data, dict):
                raise AdapterHubError(f"{path}: expected a YAML mapping")
            return data or {}, text
    return None, None


def _looks_like_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidModel(path, f"not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def recipe_base(recipe: dict | None) -> tuple[str | None, str | None]:
    """(base name or path, base fingerprint) from a merge recipe, whatever its exact layout."""
    if not recipe:
        return None, None
    base = recipe.get("base") or recipe.get("base_model")
    fp = recipe.get("base_fingerprint")
    name = None
    if isinstance(base, dict):
        name = base.get("hub_id") or base.get("name") or base.get("path") or base.get("name_or_path")
        fp = fp or base.get("fingerprint")
    elif isinstance(base, str):
        name = base
    prov = recipe.get("provenance") if isinstance(recipe.get("provenance"), dict) else {}
    fp = fp or prov.get("base_fingerprint")
    if not fp:  # adapter algebra: no base of its own, but its inputs agree on one
        fps = {i.get("base_fingerprint") for i in recipe_inputs(recipe) if isinstance(i, dict)}
        fp = fps.pop() if len(fps) == 1 else None
    return (str(name) if name else None), (str(fp) if fp else None)


def folder_provenance(folder: Path) -> dict:
    """What a folder says about itself (its adapterhub.json, or an old export's provenance.json,
    any shape ever written) as {"base_fingerprint", "parents"}; a file we cannot accept is an error."""
    from .. import provenance

    prov = provenance.read(folder)
    if prov is None:
        return {}
    return {"base_fingerprint": provenance.base_fingerprint(prov), "parents": list(prov["lineage"]["parents"])}


def source_provenance(src: Source, base_hub_id: str | None = None) -> dict:
    """The adapterhub.json a push of ``src`` carries (adapterhub_local/provenance.py, format 2)."""
    from .. import provenance

    record = src.record
    parents = list(getattr(record, "parents", None) or [])
    if not parents and src.recipe:
        parents = [str(i["ref"]) for i in recipe_inputs(src.recipe) if i.get("ref")]
    if not parents:
        parents = list(src.local_provenance.get("parents") or [])
    model = None
    if not src.is_adapter:
        model = {"fingerprint": src.model_fingerprint, "architecture": (src.config.get("architectures") or [None])[0],
                 "model_type": src.config.get("model_type")}
    return provenance.build(
        "adapter" if src.is_adapter else "merged_model", "push", base_fingerprint=src.base_fingerprint,
        base_name=src.base_name, base_hub_id=base_hub_id, record=record, parents=parents,
        children=getattr(record, "children", None) or [], inputs=recipe_inputs(src.recipe), recipe=src.recipe,
        method=(src.recipe or {}).get("method") if isinstance((src.recipe or {}).get("method"), str) else None,
        metrics=getattr(record, "metrics", None) or {}, files=src.files,
        adapter=provenance.adapter_fields(src.adapter_summary) if src.is_adapter else None, model=model,
        extra={"record_provenance": rp} if (rp := provenance.record_provenance(record)) else None)


def recipe_inputs(recipe: dict | None) -> list[dict]:
    """The merge inputs as [{ref, weight, version, sha256, path}] from whichever keys the recipe uses."""
    if not recipe:
        return []
    raw = recipe.get("inputs") or recipe.get("adapters") or recipe.get("models") or []
    weights = recipe.get("weights") or []
    out = []
    for i, item in enumerate(raw if isinstance(raw, list) else []):
        if isinstance(item, str):
            d = {"ref": item}
        elif isinstance(item, dict):
            d = dict(item)
            d.setdefault("ref", d.get("name") or d.get("adapter") or d.get("path"))
        else:
            continue
        if "weight" not in d and i < len(weights):
            d["weight"] = weights[i]
        out.append(d)
    return out


def registered_version(folder: Path, registry_home=None):
    """The newest registry version holding exactly these bytes, so pushing a folder that was
    registered is recorded on its version too. Never creates a registry."""
    from ..paths import registry_home as home

    h = home(registry_home)
    if not (h / "registry.db").is_file():
        return None
    from ..registry import open_registry

    found = open_registry(h).find_by_content(folder)
    return found[-1] if found else None


def resolve_source(ref: str, registry_home=None, fingerprint_merged: bool = True) -> Source:
    """Find what REF_OR_DIR names and gather its facts (validating it on the way)."""
    from ..peft_format import adapter_summary, check_adapter
    from ..refs import looks_like_path, resolve_adapter

    path = Path(ref).expanduser()
    record = None
    if not path.exists():
        if looks_like_path(ref):
            raise AdapterHubError(f"{ref}: no such file or directory")
        path, record = resolve_adapter(ref, registry_home)
    if not path.is_dir():
        raise AdapterHubError(f"{ref}: not a directory", "give an adapter folder, a merged model folder, "
                              "or a registry reference")

    recipe, recipe_text = _read_recipe(path)
    readme = path / "README.md"
    existing_readme = readme.read_text(encoding="utf-8", errors="replace") if readme.is_file() else None

    if _looks_like_adapter(path):
        adapter = check_adapter(path)  # every check of config and tensors, no numpy; raises InvalidAdapter
        if record is None:
            record = registered_version(path, registry_home)
        known = dict(getattr(record, "files", None) or {}) if record is not None else {}
        files, sizes = _hash_files(path, known, recursive=False)
        src = Source(kind="adapter", folder=path, ref=ref, record=record, recipe=recipe,
                     recipe_text=recipe_text, config=dict(adapter.config), files=files, sizes=sizes,
                     adapter_summary=adapter_summary(adapter, norms=False), existing_readme=existing_readme)
        src.base_name = adapter.base_model
        if record is not None:
            src.base_fingerprint = getattr(record, "base_fingerprint", None)
            prov = getattr(record, "provenance", None) or {}
            if src.recipe is None and isinstance(prov.get("recipe"), dict):
                src.recipe = prov["recipe"]
        src.local_provenance = folder_provenance(path)
        if not src.base_fingerprint:
            src.base_fingerprint = recipe_base(src.recipe)[1] or src.local_provenance.get("base_fingerprint")
        return src

    if (path / "config.json").is_file():
        from ..fingerprint import fingerprint_model, model_files

        model_files(path)  # raises InvalidModel when there are no safetensors weights
        config = _load_json(path / "config.json")
        known = {}
        model_fp = None
        if fingerprint_merged:
            fp = fingerprint_model(path, progress=True)
            model_fp = fp.fingerprint
            known = dict(fp.files)
        files, sizes = _hash_files(path, known)
        base_name, base_fp = recipe_base(recipe)
        if not base_name:
            base_name = config.get("_name_or_path") or None
        local = folder_provenance(path)
        return Source(kind="merged", folder=path, ref=ref, record=record, recipe=recipe,
                      recipe_text=recipe_text, config=config, files=files, sizes=sizes,
                      base_fingerprint=base_fp or local.get("base_fingerprint"), base_name=base_name,
                      model_fingerprint=model_fp, existing_readme=existing_readme, local_provenance=local)

    raise AdapterHubError(
        f"{path}: neither a PEFT adapter (no adapter_config.json) nor a model folder (no config.json)",
        "push an adapter folder, a merge output folder, or a registry reference",
    )
