"""The demo's steps, in story order (see story.py for how they print and run)."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import AdapterHubError
from . import corpus
from .story import BASE_VAR, DOMAINS, Story

EVAL_TOL = 1e-4  # float32 forward passes of the same weights, summed in another order


def run_steps(story: Story) -> None:
    files = corpus.write_domain_files(Path("data"), story.sizes.n_train, story.sizes.n_eval,
                                      domains=list(DOMAINS))
    story.summary["data"] = {d: {k: str(v) for k, v in f.items()} for d, f in files.items()}
    refs = {}
    step_fingerprint(story)
    refs.update(step_train(story, files))
    if len(refs) < len(DOMAINS):
        story.out("# without trained adapters the rest of the story cannot run")
        return
    step_registry(story, refs)
    refs.update(step_algebra(story, refs))
    refs.update(step_merge(story, refs))
    rows = step_eval(story, refs, files)
    step_sweep(story, refs, files, rows)
    step_push(story, refs)
    step_verify(story)


def step_fingerprint(story: Story) -> None:
    story.heading("Fingerprint the base model")
    story.note("a sha256 over every tensor's name, dtype, shape and bytes: adapters are bound to it")
    story.run(["fingerprint", BASE_VAR])


def step_train(story: Story, files) -> dict[str, str]:
    sz = story.sizes
    story.heading(f"Train {len(DOMAINS)} domain adapters (LoRA r={sz.rank} on all linear layers)")
    for d in DOMAINS:
        story.out(f"# {d}: {corpus.generate(d, 1, seed=1)[0][:100]}")
    register = story.available("register")
    if not register:
        story.out("# registry not available yet: training with --no-register, using folders")
    refs = {}
    for d in DOMAINS:
        args = ["train", BASE_VAR, "--data", str(files[d]["train"]), "--eval", str(files[d]["eval"]),
                "--name", d, "--out", f"runs/{d}", "--rank", str(sz.rank), "--alpha", f"{sz.alpha:g}",
                "--targets", "all-linear", "--lr", f"{sz.lr:g}", "--max-steps", str(sz.steps),
                "--batch-size", str(sz.batch_size), "--grad-accum", "1", "--eval-every",
                str(sz.eval_every), "--seq-len", "128", "--tag", f"domain={d}"]
        if not register:
            args.append("--no-register")
        story.out("")
        if story.run(args):
            refs[d] = d if register else f"runs/{d}"
    return refs


def step_registry(story: Story, refs) -> None:
    story.heading("The registry: every adapter with its base, metrics and lineage")
    story.note("`adapters train` registered each adapter with its metrics; look at them:")
    story.run(["list"])
    story.out("")
    if story.run(["alias", DOMAINS[0], "prod"]):
        story.out("")
        story.run(["show", f"{DOMAINS[0]}:prod"])
    else:
        story.run(["show", DOMAINS[0]])


def step_algebra(story: Story, refs) -> dict[str, str]:
    a, b, c = (refs[d] for d in DOMAINS)
    sz = story.sizes
    reg = story.available("register")
    story.heading("Adapter algebra: stack and interpolate (exact), compress with SVD")
    made = {}

    def go(key: str, args: list[str], out: str, name: str) -> None:
        args = [*args, "--out", out] + (["--register", name] if reg else [])
        story.out("")
        if story.run(args):
            made[key] = name if reg else out

    story.note("stack = ΔA + ΔB + ΔC exactly: ranks are concatenated (cat), nothing is approximated")
    go("stack", ["stack", a, b, c], "merges/stack-all", "stack-all")
    story.note("interpolate = 0.5·ΔA + 0.5·ΔB, exact (mixing the deltas, not A and B separately)")
    go("interp", ["interpolate", a, b, "--t", "0.5"], "merges/arith-recipes-0.5", "arith-recipes-mid")
    story.note(f"svd: the same sum compressed to rank {sz.svd_rank}; the report says what it keeps")
    go("svd", ["merge", a, b, c, "--into-adapter", "--method", "svd", "--rank", str(sz.svd_rank)],
       f"merges/stack-svd-r{sz.svd_rank}", f"stack-svd-r{sz.svd_rank}")
    return made


def step_merge(story: Story, refs) -> dict[str, str]:
    story.heading("Merge all three adapters into the base (streamed, fingerprint-checked)")
    args = ["merge", BASE_VAR, *(refs[d] for d in DOMAINS), "--out", "merged/all-three"]
    return {"merged": "merged/all-three"} if story.run(args) else {}


def _eval(story: Story, models: list[str], data: list[Path], evaluator):
    from ..eval.evaluate import evaluate_refs
    from ..eval.tables import eval_cells

    story.show_cmd(["eval", *models, "--base", BASE_VAR, *[x for d in data for x in ("--data", str(d))]])
    real = [str(story.base) if m == BASE_VAR else m for m in models]
    rows = evaluate_refs(real, data, base=story.base, evaluator=evaluator)
    for r in rows:
        if r["model"] == str(story.base):
            r["model"] = BASE_VAR
    story.out(story.table(*eval_cells(rows)))
    return rows


def step_eval(story: Story, refs, files) -> list[dict]:
    from ..eval.evaluate import Evaluator

    story.heading("Evaluate everything on every domain (eval loss, nats/token; lower is better)")
    story.note("adapters are applied to the base in memory (W + s·B·A); merged folders load as they are")
    models = [BASE_VAR, *(refs[d] for d in DOMAINS)]
    models += [refs[k] for k in ("stack", "interp", "svd", "merged") if k in refs]
    data = [files[d]["eval"] for d in DOMAINS]
    story.evaluator = Evaluator(batch_size=32)
    try:
        rows = _eval(story, models, data, story.evaluator)
    except AdapterHubError as e:
        story._failed(["eval"], str(e))
        return []
    story.summary["eval"] = rows
    loss = {(r["model"], r["label"]): r["loss"] for r in rows}
    for d in DOMAINS:
        own, base = loss[(refs[d], d)], loss[(BASE_VAR, d)]
        story.check(f"{d} adapter beats the base on {d}", own < base,
                    f"{own:.4f} < {base:.4f} ({100 * (base - own) / base:.1f}% lower)")
    if "merged" in refs and "stack" in refs:
        diff = max(abs(loss[(refs["merged"], d)] - loss[(refs["stack"], d)]) for d in DOMAINS)
        story.check("merged model equals base + stacked adapters applied in memory", diff <= EVAL_TOL,
                    f"max |Δloss| = {diff:.1e} over {len(DOMAINS)} domains")
    _record_metrics(story, refs, loss)
    return rows


def _record_metrics(story: Story, refs, loss) -> None:
    """Log every registered adapter's loss on every domain, then query the registry by it."""
    if not story.available("register") or not story.available("log-metric"):
        return
    story.out("")
    d = DOMAINS[1]
    story.note(f"record the table in the registry, then ask it which adapters beat the base on {d}")
    registered = [refs[d] for d in DOMAINS] + [refs[k] for k in ("stack", "interp", "svd") if k in refs]
    for ref in registered:
        pairs = [f"{dom}_loss={loss[(ref, dom)]:.4f}" for dom in DOMAINS if (ref, dom) in loss]
        if pairs and not story.run(["log-metric", ref, *pairs]):
            return
    story.out("")
    story.run(["list", "--where", f"{d}_loss<{loss[(BASE_VAR, d)]:.4f}", "--sort", f"{d}_loss"])


def step_sweep(story: Story, refs, files, rows) -> None:
    from ..eval.interpolation import sweep
    from ..eval.plots import PLOT_HINT, plot_sweep, plot_training
    from ..eval.tables import sweep_base_line, sweep_cells

    a, b = DOMAINS[0], DOMAINS[1]
    story.heading(f"Interpolation sweep {a} -> {b}, and the training curves")
    steps = story.sizes.sweep_steps
    story.show_cmd(["sweep", refs[a], refs[b], "--base", BASE_VAR, "--data-a", str(files[a]["eval"]),
                    "--data-b", str(files[b]["eval"]), "--steps", str(steps), "--plot", "plots/sweep.png"])
    t0 = time.perf_counter()
    try:
        res = sweep(refs[a], refs[b], files[a]["eval"], files[b]["eval"], base=story.base, steps=steps,
                    evaluator=getattr(story, "evaluator", None))
    except AdapterHubError as e:
        story._failed(["sweep"], str(e))
        return
    story.out(sweep_base_line(res))
    story.out(story.table(*sweep_cells(res)))
    story.summary["sweep"] = {**res.to_dict(), "seconds": round(time.perf_counter() - t0, 2)}
    written = plot_sweep(res, "plots/sweep.png")
    story.out(f"plot written to {Path('plots/sweep.png').resolve()}" if written else PLOT_HINT)
    if written:
        story.summary["sweep_plot"] = str(Path(written).resolve())
    loss = {(r["model"], r["label"]): r["loss"] for r in rows}
    mid = [r for r in res.rows if abs(r["t"] - 0.5) < 1e-9]
    if mid and "interp" in refs and (refs["interp"], a) in loss:
        diff = max(abs(mid[0]["loss_a"] - loss[(refs["interp"], a)]),
                   abs(mid[0]["loss_b"] - loss[(refs["interp"], b)]))
        story.check("`interpolate --t 0.5` adapter equals the sweep at t=0.5", diff <= EVAL_TOL,
                    f"max |Δloss| = {diff:.1e}")
    if (refs[a], a) in loss:
        diff = abs(res.rows[0]["loss_a"] - loss[(refs[a], a)])
        story.check(f"sweep at t=0 equals the {a} adapter", diff <= EVAL_TOL, f"|Δloss| = {diff:.1e}")
    logs = {d: Path("runs") / d / "metrics.jsonl" for d in DOMAINS}
    story.out("")
    story.note("training curves from each run's metrics.jsonl (train loss per step, eval loss dashed)")
    start = {d: loss[(BASE_VAR, d)] for d in DOMAINS if (BASE_VAR, d) in loss}
    written = plot_training({d: p for d, p in logs.items() if p.is_file()}, "plots/training.png", start)
    if written:
        story.summary["training_plot"] = str(Path(written).resolve())
        story.out(f"plot written to {Path(written).resolve()}")
    else:
        story.out(PLOT_HINT)


def step_push(story: Story, refs) -> None:
    story.heading("Publish (dry run): the exact folder and model card that would be uploaded")
    target = refs.get("merged") or refs.get("stack") or refs[DOMAINS[0]]
    args = ["push", target, "demo-user/adapterhub-demo", "--dry-run"]
    if story.has_option("push", "--dry-run-dir"):
        args += ["--dry-run-dir", "push-dry-run"]
    if not story.run(args):
        return
    card = Path("push-dry-run") / "README.md"
    if card.is_file():
        story.summary["dry_run_dir"] = str(Path("push-dry-run").resolve())
        story.out("")
        story.out("$ head -n 40 push-dry-run/README.md")
        story.out("\n".join(card.read_text(encoding="utf-8").splitlines()[:40]))


def step_verify(story: Story) -> None:
    story.heading("Verify the registry: every blob re-hashed")
    story.run(["verify"])
