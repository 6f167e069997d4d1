"""Next-token loss, summed (the loop divides by the global count of loss tokens).

Fast path: run the backbone, keep only the positions that carry a label, and
compute lm_head + cross-entropy in row chunks, working out the gradient with
respect to the hidden states in the same pass (loss is a sum, so its gradient
does not depend on anything after it). The (tokens × vocab) logits are never
held whole, and prompt tokens never reach lm_head: same math, less memory.
Models whose head is anything but a plain frozen Linear (soft-capping, logit
scales, a LoRA on lm_head) take the ordinary path through ``model(...).logits``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .speed import onednn_available, onednn_linear

IGNORE = -100
PLAIN_HEAD_TYPES = {
    "llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "phi", "gemma", "olmo", "olmo2",
    "starcoder2", "stablelm", "gpt_neox", "smollm3",
}


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, t_i), with d/dh = (softmax - onehot) @ W worked out in the same pass.

    The logits of a chunk are one large GEMM (large GEMMs run near the matmul peak,
    small ones do not); the row-wise softmax then runs on cache-sized blocks of it, in
    place, and the gradient is one more large GEMM."""

    @staticmethod
    def forward(ctx, h, weight, targets, rows, block, weight_t=None):
        """``weight_t``: weight.t().contiguous(), given to run both GEMMs through oneDNN."""
        need_grad = ctx.needs_input_grad[0]
        # under autocast the head GEMMs run in its dtype, like any Linear (weights may be
        # cast once already); the softmax always runs in float32
        autocast = torch.is_autocast_enabled(h.device.type)
        w = weight if autocast or weight.dtype == torch.float32 else weight.float()
        n = h.shape[0]
        rows = max(1, -(-n // max(1, -(-n // rows))))  # equal chunks: no small GEMM at the end
        dnnl = (weight_t is not None and not autocast and h.device.type == "cpu"
                and w.dtype is torch.float32)
        buf = (None if dnnl or autocast else
               torch.empty((min(rows, n), w.shape[0]), dtype=torch.float32, device=h.device))
        grads, losses = [], []
        for s in range(0, n, rows):
            hc = h[s:s + rows] if autocast else h[s:s + rows].float()
            if dnnl:
                logits = onednn_linear(hc, w)
            elif autocast:
                logits = hc @ w.t()
            else:
                logits = torch.mm(hc, w.t(), out=buf[:hc.shape[0]])
            losses.append(_softmax_xent_(logits, targets[s:s + rows], block, hc, w))
            if need_grad:  # (softmax - onehot) @ W
                grads.append(onednn_linear(logits, weight_t) if dnnl else logits @ w)
            del logits  # before the next chunk's: one chunk of logits alive at a time
        if need_grad:  # (no rows: a rank's empty slice of a short last micro-batch)
            ctx.save_for_backward(torch.cat(grads).to(h.dtype) if grads else torch.zeros_like(h))
        return torch.cat(losses).sum() if losses else h.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None, None


_TINY = 1e-30  # below this a softmax probability has lost its precision: recompute that row


def _softmax_xent_(logits, targets, block, hc, w):
    """Per-row -log softmax(logits)[target]; leaves softmax - onehot in ``logits``."""
    idx = targets[:, None]
    probs = []
    for b in range(0, logits.shape[0], block):
        x = logits[b:b + block]
        xf = x if x.dtype is torch.float32 else x.float()
        if xf.device.type == "cpu":
            torch._softmax(xf, 1, False, out=xf)  # in place: the block stays in cache
        else:
            xf.copy_(torch.softmax(xf, 1))
        probs.append(xf.gather(1, idx[b:b + block]).squeeze(1))
        xf.scatter_add_(1, idx[b:b + block], torch.full((xf.shape[0], 1), -1.0, device=xf.device))
        if xf is not x:
            x.copy_(xf)
    p = torch.cat(probs)
    loss = -torch.log(p)
    tiny = p < _TINY
    if bool(tiny.any()):  # a confidently wrong row: the loss from the logits themselves
        rows = tiny.nonzero().squeeze(1)
        z = (hc[rows] @ w.t()).float()
        loss[rows] = torch.logsumexp(z, 1) - z.gather(1, idx[rows]).squeeze(1)
    return loss


def plain_head(model: nn.Module) -> nn.Linear | None:
    """The frozen, bias-free Linear head when logits = head(hidden) exactly; else None."""
    cfg = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if cfg is None or type(head) is not nn.Linear or head.bias is not None:
        return None
    if head.weight.requires_grad or getattr(cfg, "model_type", None) not in PLAIN_HEAD_TYPES:
        return None
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    if not hasattr(model, getattr(model, "base_model_prefix", "") or "_none_"):
        return None
    return head


class CausalLMLoss(nn.Module):
    """forward(batch) -> summed next-token cross-entropy over labelled positions.

    Wrapping this (not the bare model) in DDP keeps the gradient hooks on the
    path we actually run.
    """

    def __init__(self, model: nn.Module, fused: bool = True, chunk_elems: int = 32 * 1024 * 1024,
                 block_elems: int = 1024 * 1024):
        super().__init__()
        self.model = model
        self.head = plain_head(model) if fused else None
        # chunk: rows of logits per GEMM (128 MB of float32); block: rows the softmax
        # works on at a time (4 MB, so it stays in cache between its passes)
        self.chunk_elems = chunk_elems
        self.block_elems = block_elems
        self.onednn = False  # the trainer turns it on (speed.use_onednn)
        self._head_t = None  # (weight, weight.t().contiguous()): the head is frozen

    def _weight_t(self):
        w = self.head.weight
        if not (self.onednn and w.device.type == "cpu" and w.dtype is torch.float32
                and onednn_available() and not torch.is_autocast_enabled("cpu")):
            return None
        if self._head_t is None or self._head_t[0] is not w:
            self._head_t = (w, w.detach().t().contiguous())
        return self._head_t[1]

    @property
    def fused(self) -> bool:
        return self.head is not None

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        targets = labels[:, 1:]
        keep = targets != IGNORE
        kw = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if position_ids is not None:
            kw["position_ids"] = position_ids
        if self.head is not None:
            backbone = getattr(self.model, self.model.base_model_prefix)
            hidden = backbone(**kw)[0][:, :-1]
            h = hidden[keep]
            vocab = self.head.weight.shape[0]
            rows = max(1, self.chunk_elems // vocab)
            block = max(1, self.block_elems // vocab)
            return _LinearCrossEntropy.apply(h, self.head.weight, targets[keep], rows, block,
                                             self._weight_t())
        logits = self.model(**kw).logits[:, :-1]
        return nn.functional.cross_entropy(
            logits[keep].float(), targets[keep], reduction="sum")


def summed_loss(loss_fn: nn.Module, batches: Iterable[dict], autocast=contextlib.nullcontext,
                on_batch: Callable[[dict], None] | None = None) -> tuple[float, int]:
    """(Σ next-token NLL, number of loss tokens) over ``batches``, in eval mode without
    gradients: the one eval-loss computation, used by the trainer's eval and `adapters eval`.
    The mean loss is the first over the second, whatever the batching."""
    was = loss_fn.training
    loss_fn.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad(), autocast():
            for b in batches:
                total += float(loss_fn(b["input_ids"], b["labels"], b["attention_mask"],
                                       b["position_ids"]))
                count += b["n_loss"]
                if on_batch is not None:
                    on_batch(b)
    finally:
        loss_fn.train(was)
    return total, count
