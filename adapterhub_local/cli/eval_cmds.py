"""`adapters eval` and `adapters sweep`: thin commands over ``adapterhub_local.eval``."""

from __future__ import annotations

import click

from .output import emit_json, hint, json_option, table


def eval_table(rows: list[dict]) -> str:
    from ..eval.tables import eval_cells

    return table(*eval_cells(rows))


def sweep_table(res) -> str:
    from ..eval.tables import sweep_cells

    return table(*sweep_cells(res))


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
    from ..eval.evaluate import evaluate_refs

    rows = evaluate_refs(list(models), list(data), base=base, registry_home=app.registry_home,
                         batch_size=batch_size, seq_len=seq_len, max_examples=max_examples,
                         force=force, warn=hint)
    if as_json:
        emit_json(rows)
        return
    click.echo(eval_table(rows))


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
    from ..eval.evaluate import Evaluator
    from ..eval.interpolation import sweep
    from ..eval.tables import sweep_base_line

    ev = Evaluator(batch_size, seq_len, max_examples)
    res = sweep(a, b, data_a, data_b, base=base, steps=steps, registry_home=app.registry_home,
                force=force, warn=hint, evaluator=ev)
    written = None
    if plot:
        from ..eval.plots import PLOT_HINT, plot_sweep

        written = plot_sweep(res, plot)
        if written is None:
            hint(PLOT_HINT)
    if as_json:
        emit_json({**res.to_dict(), "plot": str(written) if written else None})
        return
    click.echo(sweep_base_line(res))
    click.echo(sweep_table(res))
    if written:
        hint(f"plot written to {written}")


COMMANDS = [eval_cmd, sweep_cmd]
