"""One dataclass holds every knob of a training run; the CLI flags map onto it 1:1."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AdapterHubError

SCHEDULES = ("cosine", "linear", "constant")


class TrainConfigError(AdapterHubError):
    """A training setting that cannot work (names the field)."""


@dataclass
class TrainConfig:
    base: str | Path  # a Hugging Face causal-LM folder
    data: str | Path  # JSONL: text | prompt+completion | messages
    name: str | None = None  # registry name; also the default output folder
    eval: str | Path | None = None
    out: str | Path | None = None  # default: ./runs/<name>
    # LoRA
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: str | list[str] = "q_proj,v_proj"  # or "all-linear"
    rslora: bool = False
    dora: bool = False  # PEFT's use_dora (lora_layers.LoraLayer)
    # optimisation
    lr: float = 2e-4
    schedule: str = "cosine"
    warmup: float = 0.03  # < 1: fraction of the steps; >= 1: a number of steps
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    epochs: float | None = None  # default 1 when max_steps is not given
    max_steps: int | None = None
    batch_size: int = 8  # per process (per GPU) micro-batch
    grad_accum: int = 4
    # data
    seq_len: int = 512
    packing: bool = False
    group_by_length: bool = True  # ignored with packing
    # precision / memory
    bf16: bool = False
    grad_checkpointing: bool = False
    # CPU speed, same math (speed.py): oneDNN GEMMs for the frozen float32 Linears,
    # large blocks kept in the heap instead of mmap'd afresh every step
    onednn: bool = True
    tune_allocator: bool = True
    # bookkeeping
    eval_every: int | None = None
    save_every: int | None = None
    save_total_limit: int | None = 2  # checkpoints kept (the best is kept apart)
    log_every: int = 1
    resume: str | Path | None = None
    seed: int = 0
    register: bool = True
    overwrite: bool = False
    threads: int | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    note: str | None = None
    registry_home: str | Path | None = None  # default: $ADAPTERS_HOME / XDG
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        def bad(fld, msg, hint=None):
            raise TrainConfigError(f"--{fld.replace('_', '-')}: {msg}", hint)

        if self.name is not None and not str(self.name).strip():
            bad("name", "must not be empty")
        if self.rank <= 0:
            bad("rank", f"must be a positive integer, got {self.rank}")
        if self.alpha <= 0:
            bad("alpha", f"must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            bad("dropout", f"must be in [0, 1), got {self.dropout}")
        if not 0 < self.lr <= 1e38:  # NaN fails too; above float32's range AdamW cannot step
            bad("lr", f"must be a positive number of at most 1e38, got {self.lr}")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"unknown schedule {self.schedule!r}", f"valid: {', '.join(SCHEDULES)}")
        if self.warmup < 0:
            bad("warmup", f"must be >= 0 (a fraction below 1, else steps), got {self.warmup}")
        if self.warmup >= 1 and self.warmup != int(self.warmup):
            bad("warmup", f"{self.warmup}: give a fraction below 1 or a whole number of steps")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min-lr-ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.epochs is not None and self.max_steps is not None:
            bad("epochs", "give --epochs or --max-steps, not both")
        if self.epochs is not None and not self.epochs > 0:
            bad("epochs", f"must be positive, got {self.epochs}")
        if self.max_steps is not None and self.max_steps <= 0:
            bad("max-steps", f"must be a positive integer, got {self.max_steps}")
        for fld in ("batch_size", "grad_accum", "seq_len", "log_every"):
            if getattr(self, fld) <= 0:
                bad(fld, f"must be a positive integer, got {getattr(self, fld)}")
        if self.seq_len < 2:
            bad("seq-len", "must be at least 2 (a token and the next one to predict)")
        for fld in ("eval_every", "save_every", "save_total_limit", "threads"):
            v = getattr(self, fld)
            if v is not None and v <= 0:
                bad(fld, f"must be a positive integer, got {v}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            bad("max-grad-norm", f"must be positive, got {self.max_grad_norm}")
        if self.weight_decay < 0:
            bad("weight-decay", f"must be >= 0, got {self.weight_decay}")
        if self.register and not self.name:
            bad("name", "is required to register the adapter", "give --name, or --no-register")
        if self.out is None and not self.name:
            bad("out", "give --out or --name (the output folder defaults to ./runs/NAME)")
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not self.targets:
            bad("targets", "is empty", "e.g. q_proj,v_proj or all-linear")
        if "all-linear" in self.targets and len(self.targets) > 1:
            bad("targets", "all-linear cannot be combined with other names")
        self.betas = tuple(self.betas)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path("runs") / str(self.name)

    @property
    def lora_hyperparameters(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "targets": ",".join(self.targets), "rslora": self.rslora,
                **({"dora": True} if self.dora else {})}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
        d["betas"] = list(self.betas)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    # what must match between a checkpoint and a --resume run for it to continue exactly
    RESUME_KEYS = ("rank", "alpha", "dropout", "targets", "rslora", "dora", "lr", "schedule", "warmup",
                   "min_lr_ratio", "weight_decay", "betas", "eps", "max_grad_norm", "batch_size",
                   "grad_accum", "seq_len", "packing", "group_by_length", "seed", "epochs",
                   "max_steps", "bf16")
