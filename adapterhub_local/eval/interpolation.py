"""Interpolation sweep: eval loss of W + (1-t)·ΔA + t·ΔB on two data sets, t = 0 … 1.

Exact: the two adapters' deltas are mixed in ΔW space (never A and B
separately) and applied in memory to one loaded base, so a sweep costs one
model load and 2·steps evaluations, and writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AdapterHubError
from .evaluate import Evaluator, data_label
from .targets import resolve_target


@dataclass
class SweepResult:
    a: str
    b: str
    base: str
    data_a: str
    data_b: str
    label_a: str
    label_b: str
    base_loss_a: float
    base_loss_b: float
    rows: list[dict] = field(default_factory=list)  # {t, loss_a, loss_b, mean}

    @property
    def best(self) -> dict:
        """The t with the lowest mean of the two losses."""
        return min(self.rows, key=lambda r: r["mean"])

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "base": self.base, "data_a": self.data_a,
                "data_b": self.data_b, "label_a": self.label_a, "label_b": self.label_b,
                "base_loss_a": self.base_loss_a, "base_loss_b": self.base_loss_b,
                "rows": self.rows, "best": self.best}


def t_values(steps: int) -> list[float]:
    if steps < 2:
        raise AdapterHubError(f"--steps must be at least 2, got {steps}")
    return [i / (steps - 1) for i in range(steps)]


def sweep(a: str, b: str, data_a: str | Path, data_b: str | Path, base: str | Path | None = None,
          steps: int = 11, registry_home=None, force: bool = False, warn=None,
          evaluator: Evaluator | None = None) -> SweepResult:
    ts = t_values(steps)
    ev = evaluator or Evaluator()
    ta = resolve_target(a, base, registry_home, force, warn)
    tb = resolve_target(b, base, registry_home, force, warn)
    for t in (ta, tb):
        if t.kind != "adapter":
            raise AdapterHubError(f"{t.ref}: is a full model; sweep interpolates two adapters",
                                  "give two adapter folders or registry refs")
    if Path(ta.base).resolve() != Path(tb.base).resolve():
        raise AdapterHubError(f"{a} and {b} resolve to different bases ({ta.base}, {tb.base})",
                              "pass --base MODEL_DIR")
    ev.records(data_a), ev.records(data_b)  # bad data fails before the model loads
    base_dir = ta.base
    res = SweepResult(
        a=a, b=b, base=str(base_dir), data_a=str(data_a), data_b=str(data_b),
        label_a=data_label(data_a), label_b=data_label(data_b),
        base_loss_a=ev.mix(base_dir, [], data_a, "eval base").loss,
        base_loss_b=ev.mix(base_dir, [], data_b, "eval base").loss,
    )
    from ..progress import bar

    with bar(len(ts), "sweep", "t") as pbar:
        for t in ts:
            mix = [(ta.adapter, 1.0 - t), (tb.adapter, t)]
            la = ev.mix(base_dir, mix, data_a, f"t={t:.2f}").loss
            lb = ev.mix(base_dir, mix, data_b, f"t={t:.2f}").loss
            res.rows.append({"t": round(t, 6), "loss_a": la, "loss_b": lb, "mean": (la + lb) / 2})
            pbar.update()
    return res
