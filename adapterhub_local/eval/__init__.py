"""Evaluation: eval loss and perplexity of models, adapters applied in memory and merged
models (``adapters eval``), interpolation sweeps (``adapters sweep``), their tables and plots.

    from adapterhub_local.eval import evaluate_refs, sweep
    rows = evaluate_refs(["./base", "support@2"], ["eval.jsonl"], base="./base")
    res = sweep("arithmetic", "recipes", "a.eval.jsonl", "b.eval.jsonl", base="./base")

Data reading, tokenization and the loss are the trainer's (``trainer.data``,
``trainer.loss``): `adapters eval` on an adapter prints the trainer's final
``eval_loss`` for the same file. Heavy imports happen on first use of an attribute.
"""

from __future__ import annotations

_EXPORTS = {
    "evaluate_refs": ".evaluate", "Evaluator": ".evaluate", "EvalResult": ".evaluate",
    "eval_loss": ".evaluate", "data_label": ".evaluate", "DataError": ".evaluate",
    "sweep": ".interpolation", "SweepResult": ".interpolation",
    "applied": ".apply",
    "resolve_target": ".targets", "Target": ".targets", "load_model": ".targets",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
