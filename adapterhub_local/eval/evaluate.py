"""Eval loss and perplexity of a model folder, a base with adapters applied, or a merged model.

An adapter is applied in memory, exactly: each module's weight becomes
W + Σ wᵢ·ΔWᵢ with ΔW = s·B·A from ``peft_format`` (orientation handled by
``LoraModule.delta``), summed in float32 (``lora.stacked_delta``), and the
original weights are put back afterwards, so one loaded base serves every
adapter, interpolation and sweep point. Merged folders load as they are.
Everything is evaluated in float32.

The data, its tokenization and the loss are the trainer's own (``trainer.data``,
``trainer.loss.summed_loss``): the loss is the token-weighted mean next-token
cross-entropy over every target token of the data file (sum of NLL / number of
tokens), the same number whatever the batch size, and the same number the
trainer logs as ``eval_loss``; perplexity is exp(loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..trainer.data import DataError, Example, eval_batches, read_jsonl, tokenize
from .apply import applied
from .targets import Target, load_model, resolve_target

__all__ = ["DataError", "EvalResult", "Evaluator", "data_label", "eval_loss", "evaluate_refs"]


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    tokens: int
    examples: int

    def to_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens,
                "examples": self.examples}


def data_label(path: str | Path) -> str:
    """``data/arithmetic.eval.jsonl`` -> ``arithmetic``."""
    name = Path(path).name
    for suffix in (".jsonl", ".json", ".eval", ".valid", ".test", ".train"):
        name = name.removesuffix(suffix)
    return name or Path(path).name


def eval_loss(model, examples: list[Example], batch_size: int = 16, pad_id: int = 0,
              desc: str = "eval") -> EvalResult:
    """Token-weighted mean next-token NLL over all labelled tokens of ``examples``."""
    from ..progress import bar
    from ..trainer.loss import CausalLMLoss, summed_loss

    if not examples:
        raise DataError("no example has a token to predict")
    batches = eval_batches(examples, batch_size, pad_id)
    with bar(len(examples), desc, "ex") as pbar:
        total, count = summed_loss(CausalLMLoss(model), batches,
                                   on_batch=lambda b: pbar.update(len(b["input_ids"])))
    loss = total / count
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700)), tokens=count,
                      examples=len(examples))


class Evaluator:
    """Loads each model once, tokenizes each data file once per tokenizer, evaluates many targets."""

    def __init__(self, batch_size: int = 16, seq_len: int = 512, max_examples: int | None = None):
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.max_examples = max_examples
        self._models: dict[str, tuple] = {}
        self._records: dict[str, list] = {}
        self._encoded: dict[tuple[str, int], list[Example]] = {}

    def model(self, path: Path, tokenizer_from: Path | None = None):
        key = str(Path(path).resolve())
        if key not in self._models:
            self._models[key] = load_model(path, tokenizer_from)
        return self._models[key]

    def records(self, data: str | Path) -> list:
        """The file's validated records (the trainer's reader), the first --max-examples."""
        key = str(Path(data).resolve())
        if key not in self._records:
            self._records[key] = read_jsonl(data)[:self.max_examples]
        return self._records[key]

    def encoded(self, tokenizer, data: str | Path) -> list[Example]:
        key = (str(Path(data).resolve()), id(tokenizer))
        if key not in self._encoded:
            self._encoded[key] = tokenize(self.records(data), tokenizer, self.seq_len, str(data))[0]
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
