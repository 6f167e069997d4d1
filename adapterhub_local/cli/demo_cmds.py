"""`adapters eval`, `adapters sweep` and `adapters demo`."""

from __future__ import annotations

import click

from .output import emit_json, hint, json_option, table


def _fmt_loss(x: float) -> str:
    return f"{x:.4f}"


def eval_table(rows: list[dict]) -> str:
    """One data file: a row per model with loss, perplexity, tokens; several: a loss matrix."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    if len(labels) == 1:
        return table([[r["model"], r["kind"], _fmt_loss(r["loss"]), f"{r['perplexity']:.3f}",
                       r["tokens"], r["examples"]] for r in rows],
                     ["model", "kind", "loss", "perplexity", "tokens", "examples"])
    from ..demo.evaluate import loss_matrix

    headers, matrix = loss_matrix(rows)
    kinds = {r["model"]: r["kind"] for r in rows}
    return table([[m["model"], kinds[m["model"]], *[_fmt_loss(m[h]) if h in m else "-" for h in headers[1:]]]
                  for m in matrix], ["model", "kind", *[f"{h} loss" for h in headers[1:]]])


@click.command("eval")
@click.argument("models", nargs=-1, required=True, metavar="MODEL_OR_REF...")
@click.option("--data", "data", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="JSONL eval file (text, prompt+completion, or messages). Repeat for several.")
@click.option("--base", type=click.Path(file_okay=False),
              help="Base model folder that adapters are applied to (default: the adapter's "
              "base_model_name_or_path when it is a local folder).")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1),
              help="Examples per forward pass (does not change the loss, only speed and memory).")
@click.option("--seq-len", default=512, show_default=True, type=click.IntRange(2),
              help="Truncate each example to this many tokens.")
@click.option("--max-examples", type=click.IntRange(1), help="Use only the first N examples of each file.")
@click.option("--force", is_flag=True, help="Evaluate even if the base's fingerprint differs from "
              "the one the adapter was trained on.")
@json_option
@click.pass_obj
def eval_cmd(app, models, data, base, batch_size, seq_len, max_examples, force, as_json):
    """Eval loss and perplexity of models, adapters on a base, or merged models.

    Each MODEL_OR_REF is a model folder (a base or a merged model, loaded as it
    is), a PEFT adapter folder, or a registry reference (`name`, `name@3`,
    `name:prod`). Adapters are applied to --base in memory, exactly
    (W + s·B·A in float32), without writing anything. The loss is the mean
    next-token cross-entropy over all target tokens (text: every token;
    prompt+completion: the completion; messages: assistant turns);
    perplexity = exp(loss). Everything runs in float32.

    \b
    Examples:
      adapters eval ./base --data eval.jsonl
      adapters eval ./base support support@1 ./merged --base ./base --data eval.jsonl
      adapters eval support --base ./base --data a.jsonl --data b.jsonl --json
    """
    from ..demo.evaluate import evaluate_refs

    rows = evaluate_refs(list(models), list(data), base=base, registry_home=app.registry_home,
                         batch_size=batch_size, seq_len=seq_len, max_examples=max_examples,
                         force=force, warn=hint)
    if as_json:
        emit_json(rows)
        return
    click.echo(eval_table(rows))


def sweep_table(res) -> str:
    best = res.best["t"]
    return table([[f"{r['t']:.2f}", _fmt_loss(r["loss_a"]), _fmt_loss(r["loss_b"]),
                   _fmt_loss(r["mean"]), "<- best mean" if r["t"] == best else ""] for r in res.rows],
                 ["t", f"loss {res.label_a}", f"loss {res.label_b}", "mean", ""])


@click.command("sweep")
@click.argument("a")
@click.argument("b")
@click.option("--base", type=click.Path(file_okay=False),
              help="Base model folder (default: the one the registry or the adapters' config names).")
@click.option("--data-a", required=True, type=click.Path(dir_okay=False), help="Eval JSONL for A's domain.")
@click.option("--data-b", required=True, type=click.Path(dir_okay=False), help="Eval JSONL for B's domain.")
@click.option("--steps", default=11, show_default=True, type=click.IntRange(2, 1001),
              help="Number of t values from 0 to 1.")
@click.option("--plot", "plot", type=click.Path(dir_okay=False), help="Write a PNG plot of the curves.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1),
              help="Examples per forward pass (does not change the loss, only speed and memory).")
@click.option("--seq-len", default=512, show_default=True, type=click.IntRange(2),
              help="Truncate each example to this many tokens.")
@click.option("--max-examples", type=click.IntRange(1), help="Use only the first N examples of each file.")
@click.option("--force", is_flag=True, help="Ignore a base fingerprint mismatch.")
@json_option
@click.pass_obj
def sweep_cmd(app, a, b, base, data_a, data_b, steps, plot, batch_size, seq_len, max_examples,
              force, as_json):
    """Interpolation curve between two adapters: eval loss of W + (1-t)·ΔA + t·ΔB.

    For t = 0, 1/(steps-1), …, 1 the two deltas are mixed exactly (in ΔW
    space, not A and B separately) and applied to the base in memory; the
    loss is measured on A's data and on B's data. Prints a table (the base's
    own losses first) and, with --plot, writes a PNG (needs matplotlib:
    pip install 'adapterhub-local[plot]').

    \b
    Example:
      adapters sweep arithmetic recipes --base ./base \\
          --data-a arithmetic.eval.jsonl --data-b recipes.eval.jsonl --plot sweep.png
    """
    from ..demo.evaluate import Evaluator
    from ..demo.sweep import sweep

    ev = Evaluator(batch_size, seq_len, max_examples)
    res = sweep(a, b, data_a, data_b, base=base, steps=steps, registry_home=app.registry_home,
                force=force, warn=hint, evaluator=ev)
    written = None
    if plot:
        from ..demo.plots import PLOT_HINT, plot_sweep

        written = plot_sweep(res, plot)
        if written is None:
            hint(PLOT_HINT)
    if as_json:
        emit_json({**res.to_dict(), "plot": str(written) if written else None})
        return
    click.echo(f"base: loss {res.label_a} {_fmt_loss(res.base_loss_a)}, "
               f"loss {res.label_b} {_fmt_loss(res.base_loss_b)}")
    click.echo(sweep_table(res))
    if written:
        hint(f"plot written to {written}")


@click.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False),
              help="Where the demo's registry, adapters, merges and plots go (default: a new temp dir).")
@click.option("--base", type=click.Path(file_okay=False),
              help="Use this local Hugging Face causal LM instead of the embedded demo base.")
@click.option("--quick", is_flag=True, help="Tiny sizes and few steps (about a minute; used by the tests).")
@click.option("--rebuild-base", is_flag=True, help="Pre-train the embedded demo base again, ignoring the cache.")
@click.option("--steps", type=click.IntRange(1), help="Training steps per adapter (default 150; "
              "24 with --quick). Fewer keeps a big --base affordable on a CPU.")
def demo_cmd(workdir, base, quick, rebuild_base, steps):
    """Run the whole story offline on a small model, printing each step as the
    command you would type and its real output.

    Builds (once; then cached) a small Llama-shaped base pre-trained on bundled
    text, trains three domain adapters, registers them, stacks, interpolates,
    compresses with SVD, merges into the base, evaluates everything, sweeps an
    interpolation, plots the curves, dry-runs a push and verifies the
    registry. Ends with the paths to explore further.

    \b
    Examples:
      adapters demo                       # a few minutes on 2 CPU cores
      adapters demo --workdir ./demo-run  # keep everything here
      adapters demo --base ./my-llama --steps 40   # your own model instead
      adapters --registry ./demo-run/registry list   # then explore
    """
    from ..demo.story import run_demo

    run_demo(workdir=workdir, base=base, quick=quick, rebuild_base=rebuild_base, steps=steps)


COMMANDS = [demo_cmd, eval_cmd, sweep_cmd]
