"""The end of a run: the PEFT folder, its model card, and the registry entry.

    out/adapter_model.safetensors, adapter_config.json   what PEFT loads
    out/trainer_state.json                               counters, metrics, data stats
    out/README.md                                        the model card (card.train_card)
    registry: the PEFT files as a new version, with tags, metrics, provenance and the
              eval curve (logs, checkpoints and best/ stay in the run folder)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..fsutil import atomic_write_text
from ..peft_format import CONFIG_NAME, WEIGHTS_NAME
from ..safetensors_io import save_safetensors
from . import checkpoint as ckpt_mod
from .config import TrainConfig


def write_run_folder(out: Path, adapter, state: dict, cfg: TrainConfig, metrics: dict,
                     base: Path, world: int) -> None:
    """The adapter in PEFT's format, the run's final state, the model card."""
    from ..card import train_card

    save_safetensors(adapter.tensors(), out / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_text(out / CONFIG_NAME, json.dumps(adapter.config, indent=2, sort_keys=True) + "\n")
    atomic_write_text(out / ckpt_mod.STATE_JSON, json.dumps(state, indent=2, sort_keys=True) + "\n")
    atomic_write_text(out / "README.md", train_card(cfg, metrics, base, world))


def register(cfg: TrainConfig, out: Path, base: Path, metrics: dict, stats, world: int,
             history: list[dict]):
    """Register the run folder's PEFT files as a new version; returns its VersionRecord."""
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
