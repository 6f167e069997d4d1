"""DDP: `torchrun --nproc-per-node 2 adapters train` equals one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from adapterhub_local.trainer import TrainConfig, train
from test_train import _texts, make_base, write_jsonl

from adapterhub_local.peft_format import load_adapter


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    base = make_base(tmp_path / "base")
    # 43 examples: the last global micro-batch is short, so one rank gets fewer rows (or none)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in _texts(43)])
    ev = write_jsonl(tmp_path / "e.jsonl", [{"text": t} for t in _texts(9, seed=3)])
    common = ["--rank", "4", "--alpha", "8", "--lr", "1e-2", "--dropout", "0", "--grad-accum", "2",
              "--epochs", "2", "--seq-len", "32", "--eval-every", "3", "--seed", "7"]
    adapters = str(Path(sys.executable).parent / "adapters")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), adapters,
           "train", str(base), "--data", str(data), "--eval", str(ev), "--name", "ddp-run",
           "--out", str(tmp_path / "ddp"), "--batch-size", "3", "--json", "--threads", "1", *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # only rank 0 prints
    assert out["ref"] == "ddp-run@1"

    single = train(TrainConfig(base=base, data=data, eval=ev, out=tmp_path / "one", register=False,
                               rank=4, alpha=8, lr=1e-2, dropout=0.0, grad_accum=2, epochs=2,
                               seq_len=32, eval_every=3, seed=7, batch_size=6))
    assert out["metrics"]["steps"] == single.metrics["steps"] == 8
    assert out["metrics"]["tokens_seen"] == single.metrics["tokens_seen"]
    assert out["metrics"]["eval_loss"] == pytest.approx(single.metrics["eval_loss"], rel=1e-5)
    ddp_t = load_adapter(tmp_path / "ddp").to_torch().tensors()
    one_t = load_adapter(single.out).to_torch().tensors()
    assert ddp_t.keys() == one_t.keys()
    for k in one_t:
        assert one_t[k].abs().max() > 0
        torch.testing.assert_close(ddp_t[k], one_t[k], atol=2e-5, rtol=1e-4)
    losses_ddp = [json.loads(x)["loss"] for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
                  if '"loss"' in x]
    losses_one = [h["loss"] for h in single.history if "loss" in h]
    assert losses_ddp == pytest.approx(losses_one, rel=1e-5)
    # rank 0 alone registered
    from adapterhub_local.registry import open_registry

    assert open_registry().resolve("ddp-run").version == 1
    with pytest.raises(Exception):
        open_registry().resolve("ddp-run@2")
