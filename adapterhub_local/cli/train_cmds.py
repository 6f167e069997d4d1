"""`adapters train`: a thin command over adapterhub_local.trainer.train."""

from __future__ import annotations

import os
import sys

import click

from .output import emit_json, fmt, json_option, table


def _tags(ctx, param, values):
    out = {}
    for v in values:
        if "=" not in v:
            raise click.BadParameter(f"{v!r}: expected KEY=VALUE")
        k, _, val = v.partition("=")
        out[k.strip()] = val.strip()
    return out


def _warmup(ctx, param, value):
    if value is None:
        return value
    try:
        w = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: a fraction of the steps (0.03) or a step count (100)") from None
    if w < 0 or (w >= 1 and w != int(w)):
        raise click.BadParameter(f"{value!r}: a fraction below 1 (0.03) or a whole number of steps (100)")
    return w


@click.command()
@click.argument("base_dir", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="Training JSONL: text | prompt+completion | messages.")
@click.option("--eval", "eval_path", type=click.Path(), help="Eval JSONL (same formats): loss and perplexity.")
@click.option("--name", help="Registry name (and default output folder ./runs/NAME).")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (PEFT adapter + logs + checkpoints).")
@click.option("--rank", "-r", type=click.IntRange(min=1), default=16, show_default=True, help="LoRA rank r.")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=32.0, show_default=True,
              help="LoRA alpha (scaling alpha/r, or alpha/sqrt(r) with --rslora).")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.05, show_default=True,
              help="Dropout on the LoRA input.")
@click.option("--targets", default="q_proj,v_proj", show_default=True,
              help="Comma-separated module names to adapt, or all-linear.")
@click.option("--rslora", is_flag=True, help="Rank-stabilised scaling alpha/sqrt(r).")
@click.option("--dora", is_flag=True, help="DoRA (PEFT's use_dora): a trained magnitude per output feature; "
              "merges into a base, not with other adapters.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-4, show_default=True,
              help="Peak learning rate (AdamW).")
@click.option("--schedule", type=click.Choice(["cosine", "linear", "constant"]), default="cosine",
              show_default=True, help="Decay after warmup.")
@click.option("--warmup", callback=_warmup, default="0.03", show_default=True,
              help="Warmup: a fraction of the steps (<1) or a number of steps.")
@click.option("--min-lr-ratio", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Decay to lr × this at the last step.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), help="Passes over the data (default 1).")
@click.option("--max-steps", type=click.IntRange(min=1), help="Optimizer steps (instead of --epochs).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Rows per micro-batch, per process.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=4, show_default=True,
              help="Micro-batches per optimizer step.")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True,
              help="Max tokens per row (longer examples are truncated, or split with --packing).")
@click.option("--packing", is_flag=True, help="Concatenate examples into full --seq-len rows "
              "(attention stays within each example).")
@click.option("--group-by-length/--no-group-by-length", default=True, show_default=True,
              help="Batch examples of similar length together (less padding); ignored with --packing.")
@click.option("--bf16", is_flag=True, help="bfloat16 autocast (GPUs, and CPUs with AVX512-BF16/AMX).")
@click.option("--grad-checkpointing", is_flag=True, help="Recompute activations in backward: less memory.")
@click.option("--onednn/--no-onednn", default=True, show_default=True,
              help="CPU float32: frozen Linear and lm_head GEMMs through oneDNN (same math, "
                   "float32 rounding; faster than MKL on some CPUs).")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="AdamW decoupled weight decay on the LoRA factors.")
@click.option("--max-grad-norm", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Clip the global gradient norm (0: no clipping).")
@click.option("--eval-every", type=click.IntRange(min=1), help="Evaluate every N steps (and always at the end).")
@click.option("--save-every", type=click.IntRange(min=1), help="Checkpoint every N steps (resumable).")
@click.option("--save-total-limit", type=click.IntRange(min=1), default=2, show_default=True,
              help="Checkpoints kept (the best-eval adapter is kept apart, in OUT/best).")
@click.option("--resume", type=click.Path(), help="Continue from a checkpoint folder (or a run folder: its latest).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds LoRA init, data order and dropout.")
@click.option("--no-register", is_flag=True, help="Do not register the result in the registry.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads (default: torch's choice).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option("--note", help="A note stored with the registered version.")
@click.option("--tag", "tags", multiple=True, callback=_tags, metavar="KEY=VALUE",
              help="Extra registry tag (repeatable).")
@json_option
@click.pass_obj
def train(app, base_dir, data, eval_path, name, out, rank, alpha, dropout, targets, rslora, dora, lr,
          schedule, warmup, min_lr_ratio, epochs, max_steps, batch_size, grad_accum, seq_len, packing,
          group_by_length, bf16, grad_checkpointing, onednn, weight_decay, max_grad_norm, eval_every,
          save_every, save_total_limit, resume, seed, no_register, overwrite, threads, device, note,
          tags, as_json):
    """Train a LoRA adapter on a Hugging Face causal LM; write a PEFT folder and register it.

    Each JSONL line is {"text": ...}, {"prompt": ..., "completion": ...} (loss on the
    completion only) or {"messages": [...]} (the tokenizer's chat template; loss on
    assistant turns only). Every line is checked before training starts.

    OUT gets the adapter (adapter_config.json + adapter_model.safetensors, loads with
    PeftModel.from_pretrained), metrics.jsonl, best/ (lowest eval loss) and
    checkpoints/step-N/ (with --save-every; --resume continues exactly). Ctrl-C saves
    a checkpoint and exits. Training runs in float32 unless --bf16 (refused on CPUs
    whose bf16 matmul is slow). Under torchrun the same command trains with DDP
    (--batch-size is per process).

    \b
    Example:
      adapters train ./base --data train.jsonl --eval eval.jsonl --name support \\
          --rank 16 --targets all-linear --max-steps 500 --eval-every 100 --save-every 100
      adapters train ./base --data train.jsonl --name support --resume runs/support
      torchrun --nproc-per-node 2 $(which adapters) train ./base --data train.jsonl --name support
    """
    if epochs is not None and max_steps is not None:
        raise click.UsageError("give --epochs or --max-steps, not both")
    from ..trainer import TrainConfig
    from ..trainer import train as run_train

    if not sys.stderr.isatty() or os.environ.get("ADAPTERS_PROGRESS") == "0":
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    cfg = TrainConfig(
        base=base_dir, data=data, eval=eval_path, name=name, out=out, rank=rank, alpha=alpha,
        dropout=dropout, targets=targets, rslora=rslora, dora=dora, lr=lr, schedule=schedule, warmup=warmup,
        min_lr_ratio=min_lr_ratio, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
        grad_accum=grad_accum, seq_len=seq_len, packing=packing, group_by_length=group_by_length,
        bf16=bf16, grad_checkpointing=grad_checkpointing, onednn=onednn, weight_decay=weight_decay,
        max_grad_norm=max_grad_norm or None, eval_every=eval_every, save_every=save_every,
        save_total_limit=save_total_limit, resume=resume, seed=seed, register=not no_register,
        overwrite=overwrite, threads=threads, device=device, note=note, tags=tags,
        registry_home=str(app.registry_home) if app is not None and not no_register else None,
    )
    result = run_train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if result.interrupted:
        click.echo(f"interrupted at step {result.metrics['steps']}; checkpoint: {result.checkpoint}", err=True)
        click.echo(f"continue with the same command plus: --resume {result.checkpoint}", err=True)
        sys.exit(130)
    if as_json:
        emit_json(result.to_dict())
        return
    m = result.metrics
    rows = [["adapter", str(result.out)]]
    if result.record is not None:
        rows.append(["registered", f"{result.record.ref}" + ("" if getattr(result.record, "is_new", True)
                                                             else " (same bytes as before)")])
    if result.best_dir is not None:
        rows.append(["best", f"{result.best_dir} (step {m.get('best_step')})"])
    for key in ("steps", "epochs", "tokens_seen", "train_loss", "eval_loss", "eval_perplexity",
                "best_eval_loss", "tokens_per_s", "wall_time_s"):
        if key in m:
            rows.append([key, fmt(m[key])])
    click.echo(table(rows))


COMMANDS = [train]
