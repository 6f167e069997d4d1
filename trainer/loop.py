"""The training loop: read it top to bottom.

    run = prepare(cfg)                  data -> tokenizer -> model (+ our LoRA layers) -> AdamW over A/B
    restore(run)                        only with --resume: weights, optimizer, counters, RNG
    while run.step < run.total:
        train_step(run)                 lr = get_lr(step); for each micro-batch of this step:
                                        loss = Σ token losses / tokens in the global batch,
                                        backward (DDP all-reduces on the last); clip; AdamW step
        evaluate_and_keep_best(run)     every --eval-every steps; a new best goes to out/best
        save_checkpoint(run)            every --save-every steps
    finish(run)                         final eval, the PEFT folder + card, the registry (publish.py)

Loss normalisation is by the number of loss tokens in the whole global batch
(all micro-batches, all ranks), so a step's gradient is the same whatever the
split into micro-batches and processes: 2 ranks × batch 4 == 1 rank × batch 8.
The state the phases share is one ``Run`` (run.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AdapterHubError, InvalidModel
from ..fsutil import atomic_write_text
from . import checkpoint as ckpt_mod
from . import data as data_mod
from . import publish
from .config import TrainConfig, TrainConfigError
from .distributed import Dist, setup, teardown, wrap
from .lora_layers import inject_lora, load_lora_weights
from .loss import CausalLMLoss, summed_loss
from .run import (
    Run,
    StopFlag,
    check_out,
    check_resume,
    hidden_size,
    load_base,
    load_tokenizer,
    make_out,
)
from .speed import (
    cast_frozen_matmul_weights,
    cpu_bf16_speedup,
    cpu_has_bf16,
    tuned_allocator,
    use_onednn,
)

SMALL_HIDDEN = 512


class TrainError(AdapterHubError):
    """Training itself failed (diverged)."""


@dataclass
class TrainResult:
    out: Path
    metrics: dict
    record: object = None  # registry VersionRecord, or None
    best_dir: Path | None = None
    checkpoint: Path | None = None  # the last checkpoint written
    interrupted: bool = False
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        rec = self.record
        return {"out": str(self.out), "metrics": self.metrics,
                "ref": getattr(rec, "ref", None), "best_dir": str(self.best_dir) if self.best_dir else None,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "interrupted": self.interrupted}


def get_lr(step: int, cfg: TrainConfig, total: int, warmup: int) -> float:
    """Linear warmup to cfg.lr over ``warmup`` steps, then cosine / linear / constant
    decay towards cfg.lr * cfg.min_lr_ratio at the last step."""
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    lo = cfg.min_lr_ratio
    return cfg.lr * (lo + (1 - lo) * decay)


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    return int(round(cfg.warmup * total)) if cfg.warmup < 1 else int(cfg.warmup)


def require_finite(params: list[torch.Tensor], step: int) -> None:
    """Refuse to go on (and so to write anything) once a LoRA weight is inf or NaN.

    The loss check alone misses the last step: its loss is computed before the update
    that may have blown the weights up."""
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise TrainError(f"training diverged: the LoRA weights are not finite after step {step}",
                         "lower --lr, or check the data; the last good checkpoint is kept")


def evaluate(loss_fn: CausalLMLoss, batches: list[dict], d: Dist, autocast) -> tuple[float, float]:
    """Token-weighted mean loss over the eval set (all ranks), and its perplexity."""
    total, count = d.sum(list(summed_loss(loss_fn, batches, autocast)))
    loss = total / max(count, 1.0)
    return loss, math.exp(min(loss, 50.0))


def train(config: TrainConfig, on_step=None) -> TrainResult:
    """Train one LoRA adapter; returns where it went, its metrics and its registry record.

    ``on_step(step, metrics)`` is called after every optimizer step (on every rank).
    Works the same in one process and under ``torchrun`` (DDP).
    """
    d, device = setup(config.device)
    threads = torch.get_num_threads()
    try:
        with tuned_allocator(config.tune_allocator and device.type == "cpu"):
            return _train(config, d, device, on_step)
    finally:
        torch.set_num_threads(threads)  # we may have changed it for this run only
        teardown(d)


def _train(cfg: TrainConfig, d: Dist, device: torch.device, on_step) -> TrainResult:
    from ..progress import bar

    run = prepare(cfg, d, device)
    if run.resume is not None:
        restore(run)
    begin(run)
    pbar = bar(total=run.total, desc="train", unit="step", initial=run.step) if d.is_main else None
    interrupted = False
    with StopFlag() as stop:
        while run.step < run.total:
            entry = train_step(run)
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{run.train_loss:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}",
                                 refresh=False)
            if run.has_eval and cfg.eval_every and (run.step % cfg.eval_every == 0
                                                    or run.step == run.total):
                ev_loss, ev_ppl = evaluate_and_keep_best(run)
                if pbar is not None:
                    pbar.write(f"step {run.step}: eval loss {ev_loss:.4f}, perplexity {ev_ppl:.3f}",
                               file=sys.stderr)
            if cfg.save_every and run.step % cfg.save_every == 0 and run.step < run.total:
                save_checkpoint(run)
            if on_step is not None:
                on_step(run.step, entry)
            (stop_now,) = d.sum([1.0 if stop.set else 0.0])
            if stop_now and run.step < run.total:
                interrupted = True
                break
    if pbar is not None:
        pbar.close()
    return finish(run, interrupted)


# ---- prepare: everything that can fail on bad input fails here, before training ---------


def prepare(cfg: TrainConfig, d: Dist, device: torch.device) -> Run:
    """Check the input, read and tokenize the data, build the model, optimizer and plan;
    create --out only once all of that worked."""
    t_start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base = Path(cfg.base)
    if not base.is_dir():
        raise InvalidModel(base, "no such directory" if not base.exists() else "not a directory")
    _check_precision(cfg, device)
    if cfg.register:
        from ..registry.common import check_name

        check_name(cfg.name)
    resume = ckpt_mod.load_checkpoint(cfg.resume) if cfg.resume else None
    if resume is not None:
        check_resume(resume, cfg, d.world)

    # ---- data --------------------------------------------------------------------------
    train_records = data_mod.read_jsonl(cfg.data)
    eval_records = data_mod.read_jsonl(cfg.eval) if cfg.eval else None
    tok = load_tokenizer(base)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    train_ex, train_stats = data_mod.tokenize(train_records, tok, cfg.seq_len, str(cfg.data),
                                              truncate=not cfg.packing)
    eval_ex, eval_stats = (data_mod.tokenize(eval_records, tok, cfg.seq_len, str(cfg.eval))
                           if eval_records else ([], None))
    if train_stats.truncated and d.is_main:
        print(f"data: {train_stats.truncated} example(s) longer than --seq-len {cfg.seq_len} "
              "were truncated", file=sys.stderr)
    if train_stats.dropped and d.is_main:
        print(f"data: {train_stats.dropped} example(s) had no loss token left and were skipped",
              file=sys.stderr)
    out = check_out(cfg, resume["path"] if resume else None)

    # ---- model: the base, our LoRA layers, AdamW over their A/B only ------------------------
    model = load_base(base, device)
    if not cfg.threads and device.type == "cpu" and hidden_size(model) < SMALL_HIDDEN:
        # Matmuls this small gain little from threads, and on a busy machine OpenMP's
        # spinning makes 2 threads ~10x slower than 1 (measured): one thread, unless told.
        torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)  # A's init: same draws as PEFT's get_peft_model
    random.seed(cfg.seed)
    layers = inject_lora(model, cfg.targets, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora, dora=cfg.dora)
    for layer in layers.values():
        layer.to(device)
    if cfg.grad_checkpointing:
        _enable_grad_checkpointing(model)
    params = [p for layer in layers.values() for p in layer.lora_parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                            weight_decay=cfg.weight_decay)
    loss_fn = CausalLMLoss(model)
    if cfg.bf16:
        cast_frozen_matmul_weights(model, torch.bfloat16)  # what autocast casts every step
    elif cfg.onednn and device.type == "cpu":
        use_onednn(model, skip=[loss_fn.head] if loss_fn.fused else [])
        loss_fn.onednn = True  # its head GEMMs too (the loss checks oneDNN is there)

    # ---- the plan: global micro-batches of batch_size × world, grad_accum per step ---------
    items = data_mod.pack(train_ex, cfg.seq_len, pad_id) if cfg.packing else data_mod.as_items(train_ex)
    micro = cfg.batch_size * d.world
    steps_per_epoch = math.ceil(data_mod.num_micro_batches(len(items), micro) / cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil((cfg.epochs or 1.0) * steps_per_epoch))
    run = Run(cfg=cfg, d=d, device=device, base=base, out=out, model=model, n_layers=len(layers),
              params=params, opt=opt, ddp=wrap(loss_fn, d, device),
              n_trainable=sum(p.numel() for p in params),
              n_total=sum(p.numel() for p in model.parameters()), pad_id=pad_id, items=items,
              n_eval=len(eval_ex),
              eval_batches=data_mod.eval_batches(eval_ex, cfg.batch_size, pad_id, device, d.rank,
                                                 d.world),
              train_stats=train_stats, eval_stats=eval_stats, micro=micro,
              steps_per_epoch=steps_per_epoch, total=total, warm=warmup_steps(cfg, total),
              resume=resume, t_start=t_start)
    if d.is_main:  # all input is valid: now the output folder may appear
        make_out(cfg, out, resume["path"] if resume else None)
    d.barrier()
    return run


def _check_precision(cfg: TrainConfig, device: torch.device) -> None:
    if cfg.bf16 and device.type == "cpu" and not cpu_has_bf16():
        raise TrainConfigError(
            f"--bf16: this CPU has no fast bfloat16 matmul (AVX512-BF16/AMX): bf16 measured "
            f"{1 / max(cpu_bf16_speedup(), 1e-9):.0f}x slower than float32 here",
            "drop --bf16 to train in float32")
    if cfg.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainConfigError("--bf16: this GPU does not support bfloat16")


def _enable_grad_checkpointing(model) -> None:
    kwargs = {"use_reentrant": False}
    try:
        if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    except ValueError as e:
        raise TrainConfigError(f"--grad-checkpointing: {e}") from None


# ---- restore: continue a checkpoint exactly --------------------------------------------


def restore(run: Run) -> None:
    """Weights, optimizer state, counters and RNG state from --resume; the old run's
    metrics log and best/ come along when the run folder is a new one."""
    resume, out = run.resume, run.out
    load_lora_weights(run.model, resume["adapter"])
    run.opt.load_state_dict(resume["optimizer"])
    st = resume["state"]
    run.step, run.tokens_seen = st["step"], st["tokens_seen"]
    run.best = st["best_eval_loss"] if st.get("best_eval_loss") is not None else math.inf
    run.best_step = st.get("best_step")
    ckpt_mod.set_rng_state(resume["rng"])
    if run.d.is_main:
        old_metrics = resume["path"] / ckpt_mod.METRICS
        if old_metrics.exists() and old_metrics.resolve() != (out / ckpt_mod.METRICS).resolve():
            shutil.copyfile(old_metrics, out / ckpt_mod.METRICS)
        old_best = resume["path"].parent.parent / "best"
        if old_best.is_dir() and old_best.resolve() != (out / "best").resolve():
            shutil.copytree(old_best, out / "best", dirs_exist_ok=True)
    run.hint(f"resuming from {resume['path']} at step {run.step}")
    if run.step >= run.total:
        raise TrainConfigError(f"--resume: the checkpoint is at step {run.step}, the run has "
                               f"{run.total} steps",
                               "that run is finished; a longer run has another schedule: start anew")


def begin(run: Run) -> None:
    """Open the metrics log, write train_config.json, say what the run will do."""
    cfg, d = run.cfg, run.d
    if d.is_main:
        # line-buffered, so `tail -f metrics.jsonl` follows the run
        run.log = (run.out / ckpt_mod.METRICS).open("a", encoding="utf-8", buffering=1)
        atomic_write_text(run.out / "train_config.json",
                          json.dumps(run.saved_cfg, indent=2, sort_keys=True) + "\n")
        s = run.train_stats
        run.hint(f"train: {s.examples} examples ({s.loss_tokens:,} loss tokens) -> "
                 f"{len(run.items)} rows{' packed' if cfg.packing else ''}; {run.total} steps of "
                 f"{run.micro * cfg.grad_accum} rows; LoRA r={cfg.rank} on {run.n_layers} modules, "
                 f"{run.n_trainable:,} trainable of {run.n_total:,} parameters"
                 f"{'; world size ' + str(d.world) if d.enabled else ''}")
        if cfg.bf16:
            run.hint("precision: bfloat16 autocast, float32 LoRA weights and optimizer state")
        elif run.device.type == "cpu":
            speed = cpu_bf16_speedup()
            run.hint("precision: float32 (this CPU has no fast bfloat16 matmul: bf16 measured "
                     f"{1 / max(speed, 1e-9):.0f}x slower)" if speed < 0.5 else
                     f"precision: float32 (bf16 matmul measured {speed:.1f}x float32 on this CPU: "
                     "--bf16 trades precision for speed)")
    run.t_loop, run.tokens_at_start = time.time(), run.tokens_seen
    run.ddp.train()


# ---- one optimizer step -----------------------------------------------------------------


def _step_batches(run: Run) -> list[dict]:
    """This rank's micro-batches for the current step (a seeded order per epoch)."""
    cfg, d = run.cfg, run.d
    epoch, k = divmod(run.step, run.steps_per_epoch)
    if epoch not in run.orders:
        run.orders = {epoch: data_mod.epoch_order(run.items, run.micro, cfg.seed, epoch,
                                                  cfg.group_by_length)}
    batches = []
    for mb in run.orders[epoch][k * cfg.grad_accum:(k + 1) * cfg.grad_accum]:
        rows = [run.items[i] for i in data_mod.rank_slice(mb, d.rank, d.world, cfg.batch_size)]
        if rows:
            batches.append(data_mod.collate(rows, run.pad_id, run.device))
        else:  # an empty slice of a short last micro-batch still joins the all-reduce
            batches.append({**data_mod.collate([data_mod.Item([run.pad_id] * 2, [-100] * 2)],
                                               run.pad_id, run.device), "n_tokens": 0})
    return batches


def train_step(run: Run) -> dict:
    """One optimizer step over grad_accum micro-batches; returns the step's log entry."""
    cfg, d, ddp = run.cfg, run.d, run.ddp
    batches = _step_batches(run)
    n_loss, n_tok = d.sum([sum(b["n_loss"] for b in batches), sum(b["n_tokens"] for b in batches)])
    lr = get_lr(run.step, cfg, run.total, run.warm)
    for group in run.opt.param_groups:
        group["lr"] = lr
    loss_sum = 0.0
    for i, b in enumerate(batches):
        sync = not d.enabled or i == len(batches) - 1
        with (contextlib.nullcontext() if sync else ddp.no_sync()), run.autocast():
            part = ddp(b["input_ids"], b["labels"], b["attention_mask"], b["position_ids"])
        # DDP averages gradients over ranks: scale by world to get the global-token mean
        (part * (d.world / n_loss)).backward()
        loss_sum += float(part.detach())
    grad_norm = (torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm)
                 if cfg.max_grad_norm else None)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    run.step += 1
    run.tokens_seen += int(n_tok)
    (loss_total,) = d.sum([loss_sum])
    run.train_loss = loss_total / n_loss
    bad = (f"loss is {run.train_loss}" if not math.isfinite(run.train_loss) else
           f"gradient norm is {float(grad_norm)}"
           if grad_norm is not None and not math.isfinite(float(grad_norm)) else None)
    if bad:
        raise TrainError(f"training diverged: {bad} at step {run.step}",
                         "lower --lr, or check the data; the last good checkpoint is kept")
    tps = (run.tokens_seen - run.tokens_at_start) / max(time.time() - run.t_loop, 1e-9)
    entry = {"step": run.step, "epoch": round(run.step / run.steps_per_epoch, 4), "lr": lr,
             "loss": run.train_loss, "tokens": run.tokens_seen, "tokens_per_s": round(tps, 1),
             "time": round(time.time() - run.t_start, 3)}
    if grad_norm is not None:
        entry["grad_norm"] = float(grad_norm)
    if run.step % cfg.log_every == 0 or run.step == run.total:
        run.record(entry)
    return entry


# ---- eval, best, checkpoints ------------------------------------------------------------


def evaluate_and_keep_best(run: Run) -> tuple[float, float]:
    """Eval loss now; a new best is saved to out/best. Returns (loss, perplexity)."""
    ev_loss, ev_ppl = evaluate(run.ddp, run.eval_batches, run.d, run.autocast)
    run.last_eval = (run.step, ev_loss, ev_ppl)
    run.record({"step": run.step, "eval_loss": ev_loss, "eval_perplexity": ev_ppl})
    if ev_loss < run.best:
        run.best, run.best_step = ev_loss, run.step
        require_finite(run.params, run.step)
        if run.d.is_main:
            from ..peft_format import save_adapter

            save_adapter(run.adapter(), run.out / "best", overwrite=True)
    return ev_loss, ev_ppl


def save_checkpoint(run: Run) -> None:
    require_finite(run.params, run.step)
    if run.d.is_main:
        run.log.flush()
        run.last_ckpt = ckpt_mod.save_checkpoint(
            run.out / "checkpoints" / f"step-{run.step:06d}", run.adapter(), run.opt, run.state(),
            run.out / ckpt_mod.METRICS, run.saved_cfg)
        ckpt_mod.prune(run.out / "checkpoints", run.cfg.save_total_limit)
    run.d.barrier()


# ---- finish: final eval, the PEFT folder, the registry ------------------------------------


def finish(run: Run, interrupted: bool) -> TrainResult:
    cfg, d = run.cfg, run.d
    wall = time.time() - run.t_start
    train_time = time.time() - run.t_loop
    best_dir = run.out / "best" if run.best_step else None
    if interrupted:
        save_checkpoint(run)
        if run.log is not None:
            run.log.close()
        metrics = {"train_loss": run.train_loss, "tokens_seen": run.tokens_seen, "steps": run.step}
        return TrainResult(out=run.out, metrics=metrics, checkpoint=run.last_ckpt, interrupted=True,
                           history=run.history, best_dir=best_dir)

    if run.has_eval and (run.last_eval is None or run.last_eval[0] != run.step):
        evaluate_and_keep_best(run)
    metrics = {"train_loss": run.train_loss, "tokens_seen": run.tokens_seen, "steps": run.step,
               "epochs": round(run.step / run.steps_per_epoch, 4), "wall_time_s": round(wall, 3),
               "train_time_s": round(train_time, 3),
               "tokens_per_s": round((run.tokens_seen - run.tokens_at_start) / max(train_time, 1e-9), 1),
               "trainable_parameters": run.n_trainable}
    if run.last_eval is not None:
        metrics.update({"eval_loss": run.last_eval[1], "eval_perplexity": run.last_eval[2],
                        "best_eval_loss": run.best,
                        "best_eval_perplexity": math.exp(min(run.best, 50.0)),
                        "best_step": run.best_step})
    require_finite(run.params, run.step)
    result = TrainResult(out=run.out, metrics=metrics, history=run.history,
                         checkpoint=run.last_ckpt, best_dir=run.out / "best" if run.best_step else None)
    if d.is_main:
        state = {**run.state(), "metrics": metrics, "data": run.train_stats.to_dict(),
                 "eval_data": run.eval_stats.to_dict() if run.eval_stats else None}
        publish.write_run_folder(run.out, run.adapter(), state, cfg, metrics, run.base, d.world)
        run.log.close()
        if cfg.register:
            result.record = publish.register(cfg, run.out, run.base, metrics, run.train_stats,
                                             d.world, run.history)
    d.barrier()
    return result
