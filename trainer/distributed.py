"""torch.distributed for the trainer: set up from torchrun's environment, nothing else.

``torchrun --nproc-per-node N adapters train ...`` sets RANK, WORLD_SIZE and
LOCAL_RANK; we join the process group (nccl on CUDA, gloo on CPU), wrap the
model in DDP, give each rank its slice of every global micro-batch, and let
rank 0 alone write files and register.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """All-reduce a few scalars (float64 so token counts stay exact)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        if self.backend == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
        return t.cpu().tolist()

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def setup(device: str = "auto") -> tuple[Dist, torch.device]:
    """Join the process group when torchrun started us; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        from ..errors import AdapterHubError

        raise AdapterHubError(f"--device {device}: CUDA is not available on this machine")
    if want_cuda:
        dev = torch.device(f"cuda:{local}") if world > 1 or device in ("auto", "cuda") else torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    d = Dist(rank=rank, world=world, local_rank=local)
    if world > 1:
        d.backend = "nccl" if dev.type == "cuda" else "gloo"
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend=d.backend)
    return d, dev


def teardown(d: Dist) -> None:
    if d.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap(module: torch.nn.Module, d: Dist, device: torch.device) -> torch.nn.Module:
    if not d.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    # buffers (rotary tables) are identical on every rank: no need to sync them each forward
    import inspect

    params = inspect.signature(DDP.__init__).parameters
    kw = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return DDP(module, device_ids=ids, **kw)
