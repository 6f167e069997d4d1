"""What a user names on the command line: a model folder, a PEFT folder or a registry
reference, resolved to something we can evaluate (with the base an adapter needs, its
fingerprint checked), and the model loading itself."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AdapterHubError, InvalidAdapter, InvalidModel


def is_model_dir(path: Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    )


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load_model(path: str | Path, tokenizer_from: str | Path | None = None):
    """(model in float32, eval mode; tokenizer) from a Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    if not is_model_dir(path):
        raise InvalidModel(path, "not a model folder (need config.json and model.safetensors "
                           "or model.safetensors.index.json)")
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for bad folders
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InvalidModel(path, f"cannot load as a causal LM ({msg})") from None
    model.eval()
    model.requires_grad_(False)  # frozen: the loss can take the fused lm_head path
    tokenizer = None
    for source in (path, tokenizer_from):
        if source is not None and tokenizer is None:
            with contextlib.suppress(Exception):  # no tokenizer there: try the next place
                tokenizer = AutoTokenizer.from_pretrained(str(source))
    if tokenizer is None:
        raise InvalidModel(path, "no tokenizer found", "the model folder (or --base) needs tokenizer files")
    return model, tokenizer


# --- what a user names on the command line -------------------------------------------------

@dataclass
class Target:
    ref: str
    kind: str  # "model" | "adapter"
    path: Path
    base: Path | None = None
    record: object = None
    adapter: object = None
    weight: float = 1.0
    extra: dict = field(default_factory=dict)


def _provenance_fingerprint(folder: Path) -> str | None:
    from .. import provenance

    return provenance.base_fingerprint(provenance.read(folder))


def _registered_base(fingerprint: str, registry_home=None) -> Path | None:
    """A local folder the registry knows for this base fingerprint, if one still exists."""
    from ..registry import open_registry

    try:
        bases = open_registry(registry_home).base_models()
    except Exception:  # noqa: BLE001 - an older registry without the table: no hint
        return None
    for row in bases:
        path = row.get("name_or_path")
        if row.get("fingerprint") == fingerprint and path and is_model_dir(Path(path)):
            return Path(path)
    return None


def resolve_target(ref: str, base: str | Path | None = None, registry_home=None,
                   force: bool = False, warn=None) -> Target:
    """A model folder, a PEFT folder, or a registry reference, with the base it needs."""
    from ..peft_format import load_adapter
    from ..refs import resolve_adapter

    path = Path(ref).expanduser()
    if path.is_dir() and is_model_dir(path) and not is_adapter_dir(path):
        return Target(ref=ref, kind="model", path=path)
    if path.exists() and not path.is_dir():
        raise InvalidAdapter(path, "not a directory", "give a model folder, a PEFT folder or a registry ref")
    if path.is_dir() and not is_adapter_dir(path):
        raise InvalidModel(path, "neither a model folder (config.json + model.safetensors) nor a PEFT "
                           "adapter folder (adapter_config.json)")
    folder, record = resolve_adapter(ref, registry_home)
    adapter = load_adapter(folder)
    base_dir = Path(base).expanduser() if base else None
    expected = getattr(record, "base_fingerprint", None) or _provenance_fingerprint(Path(folder))
    if base_dir is None and expected and record is not None:
        base_dir = _registered_base(expected, registry_home)
    if base_dir is None:
        hinted = adapter.base_model
        if hinted and is_model_dir(Path(hinted)):
            base_dir = Path(hinted)
    if base_dir is None:
        raise AdapterHubError(f"{ref}: an adapter needs a base model to evaluate on",
                              "pass --base MODEL_DIR")
    if not is_model_dir(base_dir):
        raise InvalidModel(base_dir, "not a model folder (need config.json and model.safetensors)")
    if expected:
        from ..errors import BaseMismatch
        from ..fingerprint import fingerprint_model

        found = fingerprint_model(base_dir).fingerprint
        if found != expected:
            if not force:
                err = BaseMismatch(expected, found)
                err.hint = "give the base the adapter was trained on, or --force to evaluate anyway"
                raise err
            if warn:
                warn(f"warning: {ref} was trained on {expected}, evaluating on {found} (--force)")
    return Target(ref=ref, kind="adapter", path=Path(folder), base=base_dir, record=record,
                  adapter=adapter)
