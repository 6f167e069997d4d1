"""The training loop: read it top to bottom.

    data -> tokenizer -> model (+ our LoRA layers) -> AdamW over A/B only
    for step in range(max_steps):
        lr = get_lr(step)
        for each micro-batch of this step:  loss = Σ token losses / tokens in the global batch
            loss.backward()                  (DDP all-reduces on the last one)
        clip, optimizer.step()
        log / eval / checkpoint
    write the PEFT folder, register it

Loss normalisation is by the number of loss tokens in the whole global batch
(all micro-batches, all ranks), so a step's gradient is the same whatever the
split into micro-batches and processes: 2 ranks × batch 4 == 1 rank × batch 8.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AdapterHubError, InvalidModel
from ..fsutil import atomic_write_text, save_safetensors
from ..peft_format import CONFIG_NAME, WEIGHTS_NAME
from . import checkpoint as ckpt_mod
from . import data as data_mod
from .config import TrainConfig, TrainConfigError
from .distributed import Dist, setup, teardown, wrap
from .lora_layers import extract_adapter, inject_lora, load_lora_weights
from .loss import CausalLMLoss, summed_loss
from .speed import cast_frozen_matmul_weights, tuned_allocator, use_onednn


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


SMALL_HIDDEN = 512


def _hidden_size(model) -> int:
    c = model.config
    c = c.get_text_config() if hasattr(c, "get_text_config") else c
    return int(getattr(c, "hidden_size", None) or getattr(c, "n_embd", None) or 1 << 20)


_BF16_SPEEDUP: float | None = None


def cpu_bf16_speedup() -> float:
    """Measured bf16 / fp32 matmul throughput ratio on this CPU (once per process, ~10 ms).

    CPU flags are not enough: without AVX512-BF16/AMX kernels torch falls back to
    ~1 GFLOP/s bf16 code, ~100x slower than float32, while CPUs with them run bf16
    several times faster. So we time it."""
    global _BF16_SPEEDUP
    if _BF16_SPEEDUP is None:
        import time as _t

        g = torch.Generator().manual_seed(0)  # never touch the global RNG: seeded runs rely on it

        def rate(dtype):
            a = torch.randn(192, 192, generator=g).to(dtype)
            b = torch.randn(192, 192, generator=g).to(dtype)
            a @ b
            best = math.inf
            for _ in range(3):
                t0 = _t.perf_counter()
                a @ b
                best = min(best, _t.perf_counter() - t0)
            return 1.0 / max(best, 1e-9)

        _BF16_SPEEDUP = rate(torch.bfloat16) / rate(torch.float32)
    return _BF16_SPEEDUP


def cpu_has_bf16() -> bool:
    """True when bfloat16 matmul is at least half as fast as float32 here."""
    return cpu_bf16_speedup() >= 0.5


def _hint(msg: str, d: Dist) -> None:
    if d.is_main:
        print(msg, file=sys.stderr)


class _StopFlag:
    """First Ctrl-C: finish the step, save a checkpoint, stop. Second: stop now."""

    def __init__(self):
        self.set = False
        self._old = None

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: no handler
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        print("\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def load_tokenizer(base: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(base))
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InvalidModel(base, f"no usable tokenizer ({msg})",
                           "the base folder needs tokenizer files (tokenizer.json or similar)") from None
    return tok


def load_base(base: Path, device: torch.device):
    from transformers import AutoModelForCausalLM

    if not (base / "config.json").is_file():
        raise InvalidModel(base, "no config.json", "give a Hugging Face model folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InvalidModel(base, f"AutoModelForCausalLM cannot load it ({msg})") from None
    model.config.use_cache = False
    return model.to(device)


def _check_out(cfg: TrainConfig, resume_from: Path | None) -> Path:
    """Refuse an --out we would clobber (before any work); created later, once all input is valid."""
    out = cfg.out_dir
    if out.exists() and not out.is_dir():
        raise AdapterHubError(f"--out {out}: exists and is not a directory")
    inside = resume_from is not None and out.resolve() in resume_from.resolve().parents
    if out.exists() and any(out.iterdir()) and not inside and not cfg.overwrite:
        raise AdapterHubError(f"--out {out}: already exists and is not empty",
                              "choose another --out, pass --overwrite, or --resume a checkpoint")
    return out


def _make_out(cfg: TrainConfig, out: Path, resume_from: Path | None) -> None:
    inside = resume_from is not None and out.resolve() in resume_from.resolve().parents
    if out.exists() and any(out.iterdir()) and not inside and cfg.overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _check_resume(blob: dict, cfg: TrainConfig, world: int) -> None:
    old = blob["config"]
    new = cfg.to_dict()
    diff = [k for k in TrainConfig.RESUME_KEYS if k in old and old[k] != new.get(k)]
    if old.get("world_size", 1) != world:
        diff.append(f"world size ({old.get('world_size', 1)} -> {world})")
    if diff:
        raise ckpt_mod.CheckpointError(
            f"--resume {blob['path']}: settings differ from the checkpoint's: {', '.join(diff)}",
            "resume with the same flags, or start a new run")


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
    t_start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base = Path(cfg.base)
    if not base.is_dir():
        raise InvalidModel(base, "no such directory" if not base.exists() else "not a directory")

    # ---- precision: say why when we pick float32 --------------------------------------
    if cfg.bf16 and device.type == "cpu" and not cpu_has_bf16():
        raise TrainConfigError(
            f"--bf16: this CPU has no fast bfloat16 matmul (AVX512-BF16/AMX): bf16 measured "
            f"{1 / max(cpu_bf16_speedup(), 1e-9):.0f}x slower than float32 here",
            "drop --bf16 to train in float32")
    if cfg.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainConfigError("--bf16: this GPU does not support bfloat16")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)

    # ---- everything that can fail on bad input fails here, before training --------------
    if cfg.register:
        from ..registry.core import check_name

        check_name(cfg.name)
    resume = ckpt_mod.load_checkpoint(cfg.resume) if cfg.resume else None
    if resume is not None:
        _check_resume(resume, cfg, d.world)
    train_records = data_mod.read_jsonl(cfg.data)
    eval_records = data_mod.read_jsonl(cfg.eval) if cfg.eval else None
    tok = load_tokenizer(base)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    train_ex, train_stats = data_mod.tokenize(train_records, tok, cfg.seq_len, str(cfg.data),
                                              truncate=not cfg.packing)
    eval_ex, eval_stats = (data_mod.tokenize(eval_records, tok, cfg.seq_len, str(cfg.eval))
                           if eval_records else ([], None))
    if train_stats.truncated and d.is_main:
        _hint(f"data: {train_stats.truncated} example(s) longer than --seq-len {cfg.seq_len} "
              "were truncated", d)
    if train_stats.dropped:
        _hint(f"data: {train_stats.dropped} example(s) had no loss token left and were skipped", d)
    out = _check_out(cfg, resume["path"] if resume else None)

    model = load_base(base, device)
    if not cfg.threads and device.type == "cpu" and _hidden_size(model) < SMALL_HIDDEN:
        # Matmuls this small gain little from threads, and on a busy machine OpenMP's
        # spinning makes 2 threads ~10x slower than 1 (measured): one thread, unless told.
        torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)  # A's init: same draws as PEFT's get_peft_model
    random.seed(cfg.seed)
    layers = inject_lora(model, cfg.targets, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora, dora=cfg.dora)
    for layer in layers.values():
        layer.to(device)
    if cfg.grad_checkpointing:
        kwargs = {"use_reentrant": False}
        try:
            if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5 name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        except ValueError as e:
            raise TrainConfigError(f"--grad-checkpointing: {e}") from None
    params = [p for layer in layers.values() for p in layer.lora_parameters()]
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                            weight_decay=cfg.weight_decay)
    loss_fn = CausalLMLoss(model)
    if cfg.bf16:
        cast_frozen_matmul_weights(model, torch.bfloat16)  # what autocast casts every step
    elif cfg.onednn and device.type == "cpu":
        use_onednn(model, skip=[loss_fn.head] if loss_fn.fused else [])
        loss_fn.onednn = True  # its head GEMMs too (the loss checks oneDNN is there)
    ddp = wrap(loss_fn, d, device)

    # ---- the plan: global micro-batches of batch_size × world, grad_accum per step -----
    items = data_mod.pack(train_ex, cfg.seq_len, pad_id) if cfg.packing else data_mod.as_items(train_ex)
    micro = cfg.batch_size * d.world
    micro_per_epoch = data_mod.num_micro_batches(len(items), micro)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil((cfg.epochs or 1.0) * steps_per_epoch))
    warm = warmup_steps(cfg, total)
    eval_items = eval_ex
    eval_batches = data_mod.eval_batches(eval_ex, cfg.batch_size, pad_id, device, d.rank, d.world)

    if d.is_main:  # all input is valid: now the output folder may appear
        _make_out(cfg, out, resume["path"] if resume else None)
    d.barrier()
    step, tokens_seen, best, best_step, history = 0, 0, math.inf, None, []
    saved_cfg = {**cfg.to_dict(), "world_size": d.world}
    if resume is not None:
        load_lora_weights(model, resume["adapter"])
        opt.load_state_dict(resume["optimizer"])
        st = resume["state"]
        step, tokens_seen = st["step"], st["tokens_seen"]
        best = st["best_eval_loss"] if st.get("best_eval_loss") is not None else math.inf
        best_step = st.get("best_step")
        ckpt_mod.set_rng_state(resume["rng"])
        if d.is_main:
            old_metrics = resume["path"] / ckpt_mod.METRICS
            if old_metrics.exists() and old_metrics.resolve() != (out / ckpt_mod.METRICS).resolve():
                shutil.copyfile(old_metrics, out / ckpt_mod.METRICS)
            old_best = resume["path"].parent.parent / "best"
            if old_best.is_dir() and old_best.resolve() != (out / "best").resolve():
                shutil.copytree(old_best, out / "best", dirs_exist_ok=True)
        _hint(f"resuming from {resume['path']} at step {step}", d)
    if step >= total:
        raise TrainConfigError(f"--resume: the checkpoint is at step {step}, the run has {total} steps",
                               "that run is finished; a longer run has another schedule: start anew")

    metrics_path = out / ckpt_mod.METRICS
    # line-buffered, so `tail -f metrics.jsonl` follows the run
    log = metrics_path.open("a", encoding="utf-8", buffering=1) if d.is_main else None
    if d.is_main:
        atomic_write_text(out / "train_config.json", json.dumps(saved_cfg, indent=2, sort_keys=True) + "\n")
        _hint(f"train: {len(train_ex)} examples ({train_stats.loss_tokens:,} loss tokens) -> "
              f"{len(items)} rows{' packed' if cfg.packing else ''}; {total} steps of "
              f"{micro * cfg.grad_accum} rows; LoRA r={cfg.rank} on {len(layers)} modules, "
              f"{n_trainable:,} trainable of {n_total:,} parameters"
              f"{'; world size ' + str(d.world) if d.enabled else ''}", d)
        if cfg.bf16:
            _hint("precision: bfloat16 autocast, float32 LoRA weights and optimizer state", d)
        elif device.type == "cpu":
            speed = cpu_bf16_speedup()
            _hint("precision: float32 (this CPU has no fast bfloat16 matmul: bf16 measured "
                  f"{1 / max(speed, 1e-9):.0f}x slower)" if speed < 0.5 else
                  f"precision: float32 (bf16 matmul measured {speed:.1f}x float32 on this CPU: "
                  "--bf16 trades precision for speed)", d)

    def adapter_now():
        return extract_adapter(model, base_model_name_or_path=str(base), dropout=cfg.dropout)

    def state_now():
        return {"step": step, "total_steps": total, "tokens_seen": tokens_seen,
                "best_eval_loss": None if best == math.inf else best, "best_step": best_step,
                "world_size": d.world}

    last_ckpt = None

    def save_ckpt():
        nonlocal last_ckpt
        require_finite(params, step)
        if d.is_main:
            log.flush()
            last_ckpt = ckpt_mod.save_checkpoint(out / "checkpoints" / f"step-{step:06d}", adapter_now(),
                                                 opt, state_now(), metrics_path, saved_cfg)
            ckpt_mod.prune(out / "checkpoints", cfg.save_total_limit)
        d.barrier()

    def record(entry):
        history.append(entry)
        if log is not None:
            log.write(json.dumps(entry) + "\n")

    def eval_and_keep_best():
        """Eval loss now; a new best is saved to out/best. Returns (loss, perplexity)."""
        nonlocal best, best_step, last_eval
        ev_loss, ev_ppl = evaluate(ddp, eval_batches, d, autocast)
        last_eval = (step, ev_loss, ev_ppl)
        record({"step": step, "eval_loss": ev_loss, "eval_perplexity": ev_ppl})
        if ev_loss < best:
            best, best_step = ev_loss, step
            require_finite(params, step)
            if d.is_main:
                from ..peft_format import save_adapter

                save_adapter(adapter_now(), out / "best", overwrite=True)
        return ev_loss, ev_ppl

    from ..progress import bar

    orders: dict[int, list[list[int]]] = {}
    last_eval = None
    interrupted = False
    pbar = bar(total=total, desc="train", unit="step", initial=step) if d.is_main else None
    t_loop, tokens_at_start = time.time(), tokens_seen
    ddp.train()
    with _StopFlag() as stop:
        while step < total:
            # ---- one optimizer step -------------------------------------------------------
            epoch, k = divmod(step, steps_per_epoch)
            if epoch not in orders:
                orders = {epoch: data_mod.epoch_order(items, micro, cfg.seed, epoch, cfg.group_by_length)}
            mbs = orders[epoch][k * cfg.grad_accum:(k + 1) * cfg.grad_accum]
            rows = [[items[i] for i in data_mod.rank_slice(mb, d.rank, d.world, cfg.batch_size)]
                    for mb in mbs]
            batches = []
            for r in rows:
                if r:
                    batches.append(data_mod.collate(r, pad_id, device))
                else:  # an empty slice of a short last micro-batch still joins the all-reduce
                    batches.append({**data_mod.collate([data_mod.Item([pad_id] * 2, [-100] * 2)],
                                                       pad_id, device), "n_tokens": 0})
            n_loss, n_tok = d.sum([sum(b["n_loss"] for b in batches), sum(b["n_tokens"] for b in batches)])
            lr = get_lr(step, cfg, total, warm)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for i, b in enumerate(batches):
                sync = not d.enabled or i == len(batches) - 1
                with (contextlib.nullcontext() if sync else ddp.no_sync()), autocast():
                    part = ddp(b["input_ids"], b["labels"], b["attention_mask"], b["position_ids"])
                # DDP averages gradients over ranks: scale by world to get the global-token mean
                (part * (d.world / n_loss)).backward()
                loss_sum += float(part.detach())
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                         if cfg.max_grad_norm else None)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += int(n_tok)
            (loss_total,) = d.sum([loss_sum])
            train_loss = loss_total / n_loss
            bad = (f"loss is {train_loss}" if not math.isfinite(train_loss) else
                   f"gradient norm is {float(grad_norm)}"
                   if grad_norm is not None and not math.isfinite(float(grad_norm)) else None)
            if bad:
                raise TrainError(f"training diverged: {bad} at step {step}",
                                 "lower --lr, or check the data; the last good checkpoint is kept")
            elapsed = time.time() - t_loop
            tps = (tokens_seen - tokens_at_start) / max(elapsed, 1e-9)
            entry = {"step": step, "epoch": round(step / steps_per_epoch, 4), "lr": lr,
                     "loss": train_loss, "tokens": tokens_seen, "tokens_per_s": round(tps, 1),
                     "time": round(time.time() - t_start, 3)}
            if grad_norm is not None:
                entry["grad_norm"] = float(grad_norm)
            if step % cfg.log_every == 0 or step == total:
                record(entry)
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tps:.0f}", refresh=False)

            # ---- eval, best, checkpoint ---------------------------------------------------
            if eval_items and cfg.eval_every and (step % cfg.eval_every == 0 or step == total):
                ev_loss, ev_ppl = eval_and_keep_best()
                if pbar is not None:
                    pbar.write(f"step {step}: eval loss {ev_loss:.4f}, perplexity {ev_ppl:.3f}",
                               file=sys.stderr)
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                save_ckpt()
            if on_step is not None:
                on_step(step, entry)
            (stop_now,) = d.sum([1.0 if stop.set else 0.0])
            if stop_now and step < total:
                interrupted = True
                break
    if pbar is not None:
        pbar.close()
    wall = time.time() - t_start
    train_time = time.time() - t_loop

    if interrupted:
        save_ckpt()
        if log is not None:
            log.close()
        metrics = {"train_loss": train_loss, "tokens_seen": tokens_seen, "steps": step}
        return TrainResult(out=out, metrics=metrics, checkpoint=last_ckpt, interrupted=True,
                           history=history, best_dir=out / "best" if best_step else None)

    # ---- the end: final eval, the PEFT folder, the registry -----------------------------
    if eval_items and (last_eval is None or last_eval[0] != step):
        eval_and_keep_best()
    metrics = {"train_loss": train_loss, "tokens_seen": tokens_seen, "steps": step,
               "epochs": round(step / steps_per_epoch, 4), "wall_time_s": round(wall, 3),
               "train_time_s": round(train_time, 3),
               "tokens_per_s": round((tokens_seen - tokens_at_start) / max(train_time, 1e-9), 1),
               "trainable_parameters": n_trainable}
    if last_eval is not None:
        metrics.update({"eval_loss": last_eval[1], "eval_perplexity": last_eval[2],
                        "best_eval_loss": best, "best_eval_perplexity": math.exp(min(best, 50.0)),
                        "best_step": best_step})
    require_finite(params, step)
    result = TrainResult(out=out, metrics=metrics, history=history, checkpoint=last_ckpt,
                         best_dir=out / "best" if best_step else None)
    if d.is_main:
        adapter = adapter_now()
        save_safetensors(adapter.tensors(), out / WEIGHTS_NAME, metadata={"format": "pt"})
        atomic_write_text(out / CONFIG_NAME, json.dumps(adapter.config, indent=2, sort_keys=True) + "\n")
        state = {**state_now(), "metrics": metrics, "data": train_stats.to_dict(),
                 "eval_data": eval_stats.to_dict() if eval_stats else None}
        atomic_write_text(out / ckpt_mod.STATE_JSON, json.dumps(state, indent=2, sort_keys=True) + "\n")
        atomic_write_text(out / "README.md", _card(cfg, metrics, base, d.world))
        log.close()
        if cfg.register:
            result.record = _register(cfg, out, base, metrics, train_stats, d.world, history)
    d.barrier()
    return result


def _card(cfg: TrainConfig, metrics: dict, base: Path, world: int) -> str:
    lines = [
        "---", "library_name: peft", f"base_model: {base.name}", "tags:", "- lora",
        "- adapterhub-local", "---", "", f"# {cfg.name or cfg.out_dir.name}", "",
        (f"LoRA adapter trained with `adapters train` on `{Path(cfg.data).name}` "
         f"(r={cfg.rank}, alpha={cfg.alpha:g}, targets={','.join(cfg.targets)}, lr={cfg.lr:g}, "
         f"{cfg.schedule} schedule, {metrics['steps']} steps, world size {world})."), "",
        "| metric | value |", "|---|---|",
    ]
    for k, v in metrics.items():
        lines.append(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(lines) + "\n"


def _register(cfg: TrainConfig, out: Path, base: Path, metrics: dict, stats, world: int,
              history: list[dict]):
    from ..fingerprint import file_sha256
    from ..registry import open_registry

    reg = open_registry(Path(cfg.registry_home) if cfg.registry_home else None)
    tags = {"trainer": "adapterhub-local", "rank": str(cfg.rank), "alpha": f"{cfg.alpha:g}",
            "dropout": f"{cfg.dropout:g}", "targets": ",".join(cfg.targets),
            "rslora": str(cfg.rslora).lower(), "lr": f"{cfg.lr:g}", "schedule": cfg.schedule,
            "warmup": f"{cfg.warmup:g}", "batch_size": str(cfg.batch_size),
            "grad_accum": str(cfg.grad_accum), "seq_len": str(cfg.seq_len),
            "packing": str(cfg.packing).lower(), "seed": str(cfg.seed), "world_size": str(world),
            "precision": "bf16" if cfg.bf16 else "fp32", "data": Path(cfg.data).name}
    tags.update({str(k): str(v) for k, v in cfg.tags.items()})
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
    provenance = {"tool": "adapters train", "config": {**cfg.to_dict(), "world_size": world},
                  "data": {"path": str(Path(cfg.data).resolve()), "sha256": file_sha256(Path(cfg.data)),
                           **stats.to_dict()}}
    if cfg.eval:
        provenance["eval"] = {"path": str(Path(cfg.eval).resolve()), "sha256": file_sha256(Path(cfg.eval))}
    # register the PEFT files only: logs, checkpoints and best/ stay in the run folder
    stage = out / ".register"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            shutil.copyfile(out / name, stage / name)
        rec = reg.register(stage, cfg.name, base_dir=base, metrics=numeric, tags=tags, note=cfg.note,
                           provenance=provenance)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    for entry in history:  # the eval curve, step by step
        if "eval_loss" in entry:
            reg.log_metrics(rec, {"eval_loss": entry["eval_loss"],
                                  "eval_perplexity": entry["eval_perplexity"]},
                            step=entry["step"], split="eval")
    return rec
