"""One training run's state, and the checks and loaders that `loop.prepare` uses.

``Run`` holds what the loop's phases share (model, optimizer, data plan, counters,
best eval, the metrics log): one small object passed to each phase, instead of
closures over ``nonlocal`` variables.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AdapterHubError, InvalidModel
from ..fsutil import check_output
from . import checkpoint as ckpt_mod
from .config import TrainConfig
from .distributed import Dist
from .lora_layers import extract_adapter


@dataclass
class Run:
    cfg: TrainConfig
    d: Dist
    device: torch.device
    base: Path
    out: Path
    # the model and what trains it
    model: torch.nn.Module
    n_layers: int
    params: list[torch.Tensor]
    opt: torch.optim.Optimizer
    ddp: torch.nn.Module  # the loss module, DDP-wrapped when distributed
    n_trainable: int
    n_total: int
    # the data and the plan
    pad_id: int
    items: list
    n_eval: int  # eval examples on all ranks (this rank's batches may be empty)
    eval_batches: list[dict]
    train_stats: object
    eval_stats: object
    micro: int  # rows in one global micro-batch (batch_size x world)
    steps_per_epoch: int
    total: int
    warm: int
    resume: dict | None = None
    # progress
    step: int = 0
    tokens_seen: int = 0
    train_loss: float = math.nan
    best: float = math.inf
    best_step: int | None = None
    last_eval: tuple[int, float, float] | None = None  # (step, loss, perplexity)
    last_ckpt: Path | None = None
    history: list[dict] = field(default_factory=list)
    log: object = None  # metrics.jsonl, line-buffered, main rank only
    orders: dict = field(default_factory=dict)  # epoch -> its micro-batch order
    t_start: float = field(default_factory=time.time)
    t_loop: float = 0.0
    tokens_at_start: int = 0

    @property
    def saved_cfg(self) -> dict:
        return {**self.cfg.to_dict(), "world_size": self.d.world}

    @property
    def has_eval(self) -> bool:
        return self.n_eval > 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def adapter(self):
        """The LoRA factors as they are now, as a PEFT adapter."""
        return extract_adapter(self.model, base_model_name_or_path=str(self.base),
                               dropout=self.cfg.dropout)

    def state(self) -> dict:
        return {"step": self.step, "total_steps": self.total, "tokens_seen": self.tokens_seen,
                "best_eval_loss": None if self.best == math.inf else self.best,
                "best_step": self.best_step, "world_size": self.d.world}

    def record(self, entry: dict) -> None:
        self.history.append(entry)
        if self.log is not None:
            self.log.write(json.dumps(entry) + "\n")

    def hint(self, msg: str) -> None:
        if self.d.is_main:
            print(msg, file=sys.stderr)


class StopFlag:
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


def hidden_size(model) -> int:
    c = model.config
    c = c.get_text_config() if hasattr(c, "get_text_config") else c
    return int(getattr(c, "hidden_size", None) or getattr(c, "n_embd", None) or 1 << 20)


def _resumes_inside(out: Path, resume_from: Path | None) -> bool:
    return resume_from is not None and out.resolve() in resume_from.resolve().parents


def check_out(cfg: TrainConfig, resume_from: Path | None) -> Path:
    """Refuse an --out we would clobber (before any work); created later, once all input is valid."""
    out = cfg.out_dir
    # --overwrite deletes --out: it may never be (or hold) the base, the data or the registry home
    check_output(out, inputs=[cfg.base, cfg.data, cfg.eval], registry_homes=[cfg.registry_home])
    if out.exists() and not out.is_dir():
        raise AdapterHubError(f"--out {out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not _resumes_inside(out, resume_from) and not cfg.overwrite:
        raise AdapterHubError(f"--out {out}: already exists and is not empty",
                              "choose another --out, pass --overwrite, or --resume a checkpoint")
    return out


def make_out(cfg: TrainConfig, out: Path, resume_from: Path | None) -> None:
    if out.exists() and any(out.iterdir()) and not _resumes_inside(out, resume_from) and cfg.overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def check_resume(blob: dict, cfg: TrainConfig, world: int) -> None:
    old = blob["config"]
    new = cfg.to_dict()
    diff = [k for k in TrainConfig.RESUME_KEYS if k in old and old[k] != new.get(k)]
    if old.get("world_size", 1) != world:
        diff.append(f"world size ({old.get('world_size', 1)} -> {world})")
    if diff:
        raise ckpt_mod.CheckpointError(
            f"--resume {blob['path']}: settings differ from the checkpoint's: {', '.join(diff)}",
            "resume with the same flags, or start a new run")
