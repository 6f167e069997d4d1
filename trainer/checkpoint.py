"""Checkpoints: a PEFT folder plus everything needed to continue exactly.

    <out>/checkpoints/step-000200/
        adapter_config.json, adapter_model.safetensors   # loads with PeftModel as is
        trainer_state.pt     # optimizer (AdamW moments), step, RNG states, best eval
        trainer_state.json   # the same bookkeeping, readable
        metrics.jsonl        # the log up to this step

The data order is a pure function of (seed, epoch), so the step number is all
the loop needs to pick up the next batch; RNG states make dropout line up.
A folder appears only when complete (written to a temp dir, then renamed).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from ..errors import AdapterHubError
from ..fsutil import atomic_dir
from ..peft_format import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter

STATE_PT = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
METRICS = "metrics.jsonl"


class CheckpointError(AdapterHubError):
    """A --resume folder that is not a usable checkpoint."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, adapter, optimizer, state: dict, metrics_file: Path | None,
                    config: dict) -> Path:
    """Write one checkpoint folder atomically; ``state`` is plain data (step, best, ...)."""
    folder = Path(folder)
    with atomic_dir(folder, overwrite=True) as tmp:
        save_adapter(adapter, tmp / "adapter", overwrite=True)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            (tmp / "adapter" / name).rename(tmp / name)
        (tmp / "adapter").rmdir()
        torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state(), "state": state,
                    "config": config}, tmp / STATE_PT)
        (tmp / STATE_JSON).write_text(
            json.dumps({**state, "config": config}, indent=2, sort_keys=True, default=str) + "\n",
            encoding="utf-8")
        if metrics_file is not None and metrics_file.exists():
            shutil.copyfile(metrics_file, tmp / METRICS)
    return folder


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--resume {path}: no such directory")
    if (path / STATE_PT).is_file():
        return path
    ckpts = sorted((path / "checkpoints").glob("step-*")) if (path / "checkpoints").is_dir() else []
    ckpts = [c for c in ckpts if (c / STATE_PT).is_file()]
    if not ckpts:
        raise CheckpointError(f"--resume {path}: no {STATE_PT} here and no checkpoints/step-*",
                              "give a checkpoint folder written by `adapters train --save-every`")
    return max(ckpts, key=lambda c: int(c.name.split("-")[-1]))


def load_checkpoint(path: str | Path) -> dict:
    """{'adapter': LoraAdapter, 'optimizer', 'rng', 'state', 'config', 'path'}."""
    path = find_checkpoint(path)
    try:
        blob = torch.load(path / STATE_PT, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path / STATE_PT}: unreadable ({type(e).__name__}: {e})") from None
    for key in ("optimizer", "rng", "state", "config"):
        if key not in blob:
            raise CheckpointError(f"{path / STATE_PT}: missing {key!r}; not written by this trainer")
    blob["adapter"] = load_adapter(path)
    blob["path"] = path
    return blob


def prune(checkpoints_dir: Path, keep: int | None) -> None:
    """Keep the newest ``keep`` step-* folders."""
    if keep is None or not checkpoints_dir.is_dir():
        return
    ckpts = sorted((c for c in checkpoints_dir.glob("step-*") if c.is_dir()),
                   key=lambda c: int(c.name.split("-")[-1]))
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
