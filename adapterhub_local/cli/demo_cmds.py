"""`adapters demo`: the whole story, offline (the story itself is ``adapterhub_local.demo``)."""

from __future__ import annotations

import click


@click.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False),
              help="Where the demo's registry, adapters, merges and plots go (default: a new temp dir).")
@click.option("--base", type=click.Path(file_okay=False),
              help="Use this local Hugging Face causal LM instead of the embedded demo base.")
@click.option("--quick", is_flag=True, help="Tiny sizes and few steps (about a minute; used by the tests).")
@click.option("--rebuild-base", is_flag=True, help="Pre-train the embedded demo base again, ignoring the cache.")
@click.option("--steps", type=click.IntRange(1), help="Training steps per adapter (default 150; "
              "24 with --quick). Fewer keeps a big --base affordable on a CPU.")
@click.pass_context
def demo_cmd(ctx, workdir, base, quick, rebuild_base, steps):
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
    from ..demo.runner import run_demo
    from .context import AppContext
    from .output import table

    # the story runs our own commands: it is handed the CLI (the demo never imports it)
    run_demo(workdir=workdir, base=base, quick=quick, rebuild_base=rebuild_base, steps=steps,
             cli=ctx.find_root().command, app=lambda: AppContext(registry_path=None, debug=False),
             table=table)


COMMANDS = [demo_cmd]
