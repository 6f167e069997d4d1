"""The tables `adapters eval` and `adapters sweep` print, as (rows, headers) for a table
renderer (the CLI's, which escapes every cell): the demo prints the same tables."""

from __future__ import annotations


def fmt_loss(x: float) -> str:
    return f"{x:.4f}"


def loss_matrix(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """(headers, rows) with one row per model and one loss column per data label."""
    labels: list[str] = []
    by_model: dict[str, dict] = {}
    for r in rows:
        if r["label"] not in labels:
            labels.append(r["label"])
        by_model.setdefault(r["model"], {"model": r["model"]})[r["label"]] = r["loss"]
    return ["model", *labels], list(by_model.values())


def eval_cells(rows: list[dict]) -> tuple[list[list], list[str]]:
    """One data file: a row per model with loss, perplexity, tokens; several: a loss matrix."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    if len(labels) == 1:
        return ([[r["model"], r["kind"], fmt_loss(r["loss"]), f"{r['perplexity']:.3f}",
                  r["tokens"], r["examples"]] for r in rows],
                ["model", "kind", "loss", "perplexity", "tokens", "examples"])
    headers, matrix = loss_matrix(rows)
    kinds = {r["model"]: r["kind"] for r in rows}
    return ([[m["model"], kinds[m["model"]], *[fmt_loss(m[h]) if h in m else "-" for h in headers[1:]]]
             for m in matrix], ["model", "kind", *[f"{h} loss" for h in headers[1:]]])


def sweep_cells(res) -> tuple[list[list], list[str]]:
    best = res.best["t"]
    return ([[f"{r['t']:.2f}", fmt_loss(r["loss_a"]), fmt_loss(r["loss_b"]), fmt_loss(r["mean"]),
              "<- best mean" if r["t"] == best else ""] for r in res.rows],
            ["t", f"loss {res.label_a}", f"loss {res.label_b}", "mean", ""])


def sweep_base_line(res) -> str:
    return (f"base: loss {res.label_a} {fmt_loss(res.base_loss_a)}, "
            f"loss {res.label_b} {fmt_loss(res.base_loss_b)}")
