"""CPU speed-ups that change no math (the allocator, oneDNN for frozen Linears),
frozen matmul weights cast once for bf16 autocast, and whether bf16 pays here.

Allocator. glibc serves every block above its mmap threshold (at most 32 MB,
adjusted on the fly) with a fresh mmap and gives it back on free: a training step
allocates the same large activations every time, so every step pays the page
faults and the kernel's zeroing of those pages again (30-60 thousand faults per
step on the benchmark model, plus the cold-cache writes). ``tuned_allocator``
keeps large blocks in the heap for the run, and puts glibc's defaults back (and
trims the heap) when it ends. This is what PyTorch's CPU tuning guides get from
jemalloc/tcmalloc, without a preloaded library.

oneDNN. torch runs a float32 ``F.linear`` on CPU through MKL's sgemm; oneDNN's
fp32 GEMM (the library torch already ships for its mkldnn ops) is measurably
faster on some CPUs for the shapes a training step has (AMD EPYC with
AVX-512: ~10%). The frozen base Linears of the model go through it: same
float32 products and sums, only the kernel differs (results agree to float32
rounding, ~1e-7 relative). Only plain frozen ``nn.Linear`` on CPU in float32,
outside autocast; anything else keeps ``nn.Linear.forward``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import sys
import time

import torch
from torch import nn

# --- is bfloat16 fast here? ----------------------------------------------------------

_BF16_SPEEDUP: float | None = None


def cpu_bf16_speedup() -> float:
    """Measured bf16 / fp32 matmul throughput ratio on this CPU (once per process, ~10 ms).

    CPU flags are not enough: without AVX512-BF16/AMX kernels torch falls back to
    ~1 GFLOP/s bf16 code, ~100x slower than float32, while CPUs with them run bf16
    several times faster. So we time it."""
    global _BF16_SPEEDUP
    if _BF16_SPEEDUP is None:
        g = torch.Generator().manual_seed(0)  # never touch the global RNG: seeded runs rely on it

        def rate(dtype):
            a = torch.randn(192, 192, generator=g).to(dtype)
            b = torch.randn(192, 192, generator=g).to(dtype)
            a @ b
            best = math.inf
            for _ in range(3):
                t0 = time.perf_counter()
                a @ b
                best = min(best, time.perf_counter() - t0)
            return 1.0 / max(best, 1e-9)

        _BF16_SPEEDUP = rate(torch.bfloat16) / rate(torch.float32)
    return _BF16_SPEEDUP


def cpu_has_bf16() -> bool:
    """True when bfloat16 matmul is at least half as fast as float32 here."""
    return cpu_bf16_speedup() >= 0.5


# --- the allocator ----------------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_GLIBC_DEFAULT = 128 * 1024  # both thresholds start here in glibc


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018  (musl and others may lack it)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def tuned_allocator(enabled: bool = True):
    """Large blocks stay in the heap while the block runs (glibc only; else a no-op)."""
    libc = _libc() if enabled else None
    ok = libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30))
    if ok:
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31)
    try:
        yield ok
    finally:
        if ok:
            libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT)
            libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT)
            libc.malloc_trim(0)


# --- oneDNN for frozen Linears ------------------------------------------------------


def _onednn_op():
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


def onednn_available() -> bool:
    return _onednn_op() is not None


def onednn_linear(x, w, b=None):
    """x Wᵀ + b by oneDNN (float32 CPU tensors; no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class _FrozenLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W, b frozen: backward is the input gradient only, g W."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight  # a frozen parameter: nothing to version-check
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        return onednn_linear(grad.contiguous(), ctx.weight.t(), None), None, None


class OneDNNLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose float32 CPU forward and input gradient use oneDNN.

    Installed by swapping the class of existing modules (``use_onednn``), so names,
    parameters and state dicts stay exactly those of ``nn.Linear``."""

    def forward(self, x):
        w = self.weight
        if (x.dtype is torch.float32 and w.dtype is torch.float32 and x.device.type == "cpu"
                and not w.requires_grad and not torch.is_autocast_enabled("cpu")
                and (self.bias is None or not self.bias.requires_grad)):
            return _FrozenLinear.apply(x, w, self.bias) if x.requires_grad else onednn_linear(x, w, self.bias)
        return super().forward(x)


def frozen_linears(model: nn.Module, skip=()) -> list[nn.Linear]:
    skip_ids = {id(m) for m in skip}
    return [m for m in model.modules()
            if type(m) is nn.Linear and id(m) not in skip_ids and not m.weight.requires_grad
            and m.weight.dtype is torch.float32 and m.weight.device.type == "cpu"]


def use_onednn(model: nn.Module, skip=()) -> int:
    """Route the model's frozen float32 CPU Linears through oneDNN; returns how many
    (0 where this torch has no oneDNN). ``restore_linears`` undoes it.

    Always, not "when it measures faster": a choice made by timing could flip between
    two runs of the same command and break same seed -> same adapter bytes."""
    mods = frozen_linears(model, skip)
    if not mods or _onednn_op() is None:
        return 0
    for m in mods:
        m.__class__ = OneDNNLinear
    return len(mods)


def restore_linears(model: nn.Module) -> None:
    for m in model.modules():
        if type(m) is OneDNNLinear:
            m.__class__ = nn.Linear


# --- bf16: frozen matmul weights cast once ------------------------------------------


def cast_frozen_matmul_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen Linear / Conv1D weights (and biases) in ``dtype``, for autocast.

    Autocast casts a float32 weight to bf16 at every use and caches the cast only for
    weights that require grad, so a frozen base is cast afresh in every step. Casting
    once gives the very same bf16 values (round to nearest even, either way) without
    that work, and halves their memory. Weights shared with anything else (a tied
    input embedding) stay as they are. Returns how many modules were cast."""
    from .lora_layers import _kind

    shared = {id(p) for m in model.modules() if _kind(m) not in ("linear", "conv1d")
              for p in m.parameters(recurse=False)}
    n = 0
    for m in model.modules():
        if _kind(m) not in ("linear", "conv1d") or m.weight.requires_grad:
            continue
        if id(m.weight) in shared or m.weight.dtype == dtype:
            continue
        for name in ("weight", "bias"):
            p = getattr(m, name, None)
            if p is not None and not p.requires_grad and p.is_floating_point():
                setattr(m, name, nn.Parameter(p.detach().to(dtype), requires_grad=False))
        n += 1
    return n
