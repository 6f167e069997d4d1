"""Eval loss and perplexity of a model folder, a base with adapters applied, or a merged model.

An adapter is applied in memory, exactly: each module's weight becomes
W + Σ wᵢ·ΔWᵢ with ΔW = s·B·A from ``peft_format`` (orientation handled by
``LoraModule.delta``), summed in float32 (``lora.stacked_delta``), and the
original weights are put back afterwards, so one loaded base serves every
adapter, interpolation and sweep point. Merged folders load as they are.
Everything is evaluated in float32.

The loss is the token-weighted mean next-token cross-entropy over every
target token of the data file (sum of NLL / number of tokens), the same
number whatever the batch size; perplexity is exp(loss).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AdapterHubError, InvalidAdapter, InvalidModel
from .apply import applied


class DataError(AdapterHubError):
    """A data file we cannot evaluate on."""


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    tokens: int
    examples: int

    def to_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens,
                "examples": self.examples}


# --- data ------------------------------------------------------------------------------------

def read_jsonl(path: str | Path, max_examples: int | None = None) -> list[dict]:
    """Records of a JSONL file with ``text``, ``prompt``+``completion`` or ``messages``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object")
            text_ok = isinstance(rec.get("text"), str)
            pc_ok = isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str)
            chat_ok = isinstance(rec.get("messages"), list) and bool(rec["messages"])
            if not (text_ok or pc_ok or chat_ok):
                raise DataError(f"{path}:{lineno}: expected a \"text\" string, \"prompt\" + "
                                "\"completion\" strings, or a \"messages\" list")
            records.append(rec)
            if max_examples and len(records) >= max_examples:
                break
    if not records:
        raise DataError(f"{path}: no examples")
    return records


def data_label(path: str | Path) -> str:
    """``data/arithmetic.eval.jsonl`` -> ``arithmetic``."""
    name = Path(path).name
    for suffix in (".jsonl", ".json", ".eval", ".valid", ".test", ".train"):
        name = name.removesuffix(suffix)
    return name or Path(path).name


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    """Token ids, without a trailing EOS the tokenizer may add itself (we append one)."""
    ids = list(tokenizer(text, add_special_tokens=special)["input_ids"])
    eos = tokenizer.eos_token_id
    return ids[:-1] if eos is not None and ids and ids[-1] == eos else ids


def encode(tokenizer, records: list[dict], seq_len: int = 512) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per record; labels are -100 where no loss is taken.

    ``text``: the whole text, then EOS. ``prompt``/``completion``: loss on the
    completion (and EOS) only. ``messages``: the chat template, loss on the
    assistant turns only. Truncated to ``seq_len`` tokens.
    """
    eos = tokenizer.eos_token_id
    out = []
    for rec in records:
        if isinstance(rec.get("text"), str):
            ids = _ids(tokenizer, rec["text"], True) + ([eos] if eos is not None else [])
            labels = list(ids)
        elif isinstance(rec.get("prompt"), str):
            p = _ids(tokenizer, rec["prompt"], True)
            c = _ids(tokenizer, rec["completion"], False) + ([eos] if eos is not None else [])
            ids, labels = p + c, [-100] * len(p) + c
        else:
            ids, labels = _encode_messages(tokenizer, rec["messages"])
        ids, labels = ids[:seq_len], labels[:seq_len]
        if sum(1 for x in labels[1:] if x != -100) == 0:
            continue  # nothing to predict (e.g. a prompt longer than seq_len)
        out.append((ids, labels))
    return out


def _encode_messages(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """The trainer's split of a rendered conversation (so both compute the same loss):
    loss on the assistant turns only."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data has \"messages\" but the tokenizer has no chat template")
    from ..trainer.data import chat_segments

    ids: list[int] = []
    labels: list[int] = []
    for text, is_assistant in chat_segments(tokenizer, messages, "messages"):
        seg = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids += seg
        labels += seg if is_assistant else [-100] * len(seg)
    return ids, labels


def eval_loss(model, encoded: list[tuple[list[int], list[int]]], batch_size: int = 16,
              pad_id: int = 0, desc: str = "eval") -> EvalResult:
    """Token-weighted mean next-token NLL over all labelled tokens."""
    import torch

    from ..progress import bar

    if not encoded:
        raise DataError("no example has a token to predict")
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # little padding
    total, count = 0.0, 0
    with torch.no_grad(), bar(len(encoded), desc, "ex") as pbar:
        for start in range(0, len(order), batch_size):
            batch = [encoded[i] for i in order[start:start + batch_size]]
            width = max(len(ids) for ids, _ in batch)
            x = torch.full((len(batch), width), pad_id, dtype=torch.long)
            y = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (ids, labels) in enumerate(batch):
                x[row, : len(ids)] = torch.tensor(ids)
                y[row, : len(labels)] = torch.tensor(labels)
                mask[row, : len(ids)] = 1
            logits = model(input_ids=x, attention_mask=mask).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1),
                ignore_index=-100, reduction="sum",
            )
            total += float(nll)
            count += int((y[:, 1:] != -100).sum())
            pbar.update(len(batch))
    loss = total / count
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700)), tokens=count, examples=len(encoded))


# --- models and adapters ---------------------------------------------------------------------

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


class Evaluator:
    """Loads each model once, encodes each data file once per tokenizer, evaluates many targets."""

    def __init__(self, batch_size: int = 16, seq_len: int = 512, max_examples: int | None = None):
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.max_examples = max_examples
        self._models: dict[str, tuple] = {}
        self._records: dict[str, list[dict]] = {}
        self._encoded: dict[tuple[str, int], list] = {}

    def model(self, path: Path, tokenizer_from: Path | None = None):
        key = str(Path(path).resolve())
        if key not in self._models:
            self._models[key] = load_model(path, tokenizer_from)
        return self._models[key]

    def records(self, data: str | Path) -> list[dict]:
        key = str(Path(data).resolve())
        if key not in self._records:
            self._records[key] = read_jsonl(data, self.max_examples)
        return self._records[key]

    def encoded(self, tokenizer, data: str | Path) -> list:
        key = (str(Path(data).resolve()), id(tokenizer))
        if key not in self._encoded:
            self._encoded[key] = encode(tokenizer, self.records(data), self.seq_len)
        return self._encoded[key]

    def run(self, model, tokenizer, data: str | Path, desc: str = "eval") -> EvalResult:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return eval_loss(model, self.encoded(tokenizer, data), self.batch_size, pad, desc)

    def evaluate(self, target: Target, data: str | Path) -> EvalResult:
        if target.kind == "model":
            model, tok = self.model(target.path, target.base)
            return self.run(model, tok, data, f"eval {target.ref}")
        model, tok = self.model(target.base)
        with applied(model, [(target.adapter, target.weight)]):
            return self.run(model, tok, data, f"eval {target.ref}")

    def mix(self, base: Path, adapters: list[tuple[object, float]], data: str | Path,
            desc: str = "eval") -> EvalResult:
        """Eval loss of base + Σ wᵢ·ΔWᵢ, applied in memory."""
        model, tok = self.model(base)
        with applied(model, adapters):
            return self.run(model, tok, data, desc)


def evaluate_refs(refs: list[str], data_files: list[str | Path], base: str | Path | None = None,
                  registry_home=None, batch_size: int = 16, seq_len: int = 512,
                  max_examples: int | None = None, force: bool = False, warn=None,
                  evaluator: Evaluator | None = None) -> list[dict]:
    """One row per (ref, data file): {model, kind, data, loss, perplexity, tokens, examples}."""
    ev = evaluator or Evaluator(batch_size, seq_len, max_examples)
    targets = [resolve_target(r, base, registry_home, force, warn) for r in refs]
    for data in data_files:
        ev.records(data)  # bad data fails before any model loads
    rows = []
    for t in targets:
        for data in data_files:
            res = ev.evaluate(t, data)
            rows.append({"model": t.ref, "kind": t.kind, "base": str(t.base) if t.base else None,
                         "data": str(data), "label": data_label(data), **res.to_dict()})
    return rows


def loss_matrix(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """(headers, rows) with one row per model and one loss column per data label."""
    labels: list[str] = []
    by_model: dict[str, dict] = {}
    for r in rows:
        if r["label"] not in labels:
            labels.append(r["label"])
        by_model.setdefault(r["model"], {"model": r["model"]})[r["label"]] = r["loss"]
    return ["model", *labels], list(by_model.values())
