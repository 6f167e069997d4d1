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

import torch
from torch import nn

IGNORE = -100
PLAIN_HEAD_TYPES = {
    "llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "phi", "gemma", "olmo", "olmo2",
    "starcoder2", "stablelm", "gpt_neox", "smollm3",
}


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, rows):
        need_grad = ctx.needs_input_grad[0]
        w = weight.float()
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_grad else None
        for s in range(0, h.shape[0], rows):
            hc = h[s:s + rows].float()
            tc = targets[s:s + rows]
            logits = hc @ w.T
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, tc[:, None]).squeeze(1)
            total += (lse - picked).sum()
            if need_grad:
                logits.sub_(lse[:, None]).exp_()  # softmax, in place
                logits.scatter_add_(1, tc[:, None], torch.full_like(picked[:, None], -1.0))
                grad[s:s + rows] = logits @ w
        if need_grad:
            ctx.save_for_backward(grad.to(h.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None


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

    def __init__(self, model: nn.Module, fused: bool = True, chunk_elems: int = 8 * 1024 * 1024):
        super().__init__()
        self.model = model
        self.head = plain_head(model) if fused else None
        self.chunk_elems = chunk_elems

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
            rows = max(1, self.chunk_elems // self.head.weight.shape[0])
            return _LinearCrossEntropy.apply(h, self.head.weight, targets[keep], rows)
        logits = self.model(**kw).logits[:, :-1]
        return nn.functional.cross_entropy(
            logits[keep].float(), targets[keep], reduction="sum")
