"""PNG plots: the interpolation sweep (`adapters sweep --plot`) and training curves.

matplotlib is an optional extra (``pip install 'adapterhub-local[plot]'``):
without it every function returns None and the caller prints a hint; the
tables carry the same numbers. Uses matplotlib's object API with the Agg
canvas (no pyplot, no display needed); files are written atomically.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

PLOT_HINT = "matplotlib is not installed: no plot written (pip install 'adapterhub-local[plot]')"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float = 7.0, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out: Path) -> Path:
    from ..fsutil import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue(), fsync=False)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out, 0o666 & ~umask)  # a plot is for sharing, not a private temp file
    return out


def plot_sweep(result, out: str | Path) -> Path | None:
    """Loss on data A and on data B versus t, with the base's losses as dashed lines."""
    if not have_matplotlib():
        return None
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ts = [r["t"] for r in result.rows]
    ax.plot(ts, [r["loss_a"] for r in result.rows], "o-", color="tab:blue",
            label=f"loss on {result.label_a}")
    ax.plot(ts, [r["loss_b"] for r in result.rows], "s-", color="tab:orange",
            label=f"loss on {result.label_b}")
    ax.plot(ts, [r["mean"] for r in result.rows], ":", color="gray", label="mean of the two")
    ax.axhline(result.base_loss_a, color="tab:blue", ls="--", lw=0.8, alpha=0.6,
               label=f"base on {result.label_a}")
    ax.axhline(result.base_loss_b, color="tab:orange", ls="--", lw=0.8, alpha=0.6,
               label=f"base on {result.label_b}")
    best = result.best
    ax.axvline(best["t"], color="gray", lw=0.6, alpha=0.5)
    ax.set_xlabel(f"t   (0 = {Path(result.a).name}, 1 = {Path(result.b).name});  "
                  "W + (1-t)·ΔA + t·ΔB")
    ax.set_ylabel("eval loss (nats/token)")
    ax.set_title("Interpolating two LoRA adapters (exact, in ΔW space)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, out)


def read_metrics_log(path: str | Path) -> list[dict]:
    """Records of a JSONL metrics log; lines that are not JSON objects are skipped."""
    rows = []
    path = Path(path)
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            rows.append(rec)
    return rows


def curves(records: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """{metric: [(step, value), ...]} for every numeric key with "loss" in its name."""
    out: dict[str, list[tuple[float, float]]] = {}
    for rec in records:
        step = rec.get("step")
        if not isinstance(step, (int, float)):
            continue
        for key, value in rec.items():
            if "loss" in key and isinstance(value, (int, float)) and not isinstance(value, bool):
                name = key
                split = rec.get("split")
                if key == "loss" and isinstance(split, str):
                    name = f"{split}_loss"
                out.setdefault(name, []).append((float(step), float(value)))
    return {k: sorted(v) for k, v in out.items() if v}


def _ema(values: list[float], alpha: float = 0.2) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def plot_training(logs: dict[str, str | Path], out: str | Path,
                  start: dict[str, float] | None = None) -> Path | None:
    """Training curves, one colour per adapter: train loss (faint raw, solid smoothed)
    and eval loss (dashed, dots). ``start`` gives an eval loss at step 0 (the base's)."""
    if not have_matplotlib():
        return None
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    drawn = 0
    for i, (label, path) in enumerate(logs.items()):
        color = colors[i % len(colors)]
        for metric, points in curves(read_metrics_log(path)).items():
            if metric.startswith("best"):
                continue
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            if "eval" in metric:
                if start and label in start:
                    xs, ys = [0.0, *xs], [start[label], *ys]
                ax.plot(xs, ys, ls="--", marker="o", ms=4, color=color, label=f"{label}: {metric}")
            else:
                ax.plot(xs, ys, lw=0.6, alpha=0.3, color=color)
                ax.plot(xs, _ema(ys), color=color, label=f"{label}: {metric} (smoothed)")
            drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    title = "Training curves of the domain adapters"
    ax.set_title(title + (" (eval at step 0 = the base)" if start else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, out)
