"""Merge methods as data: one explicit METHODS dict, each a pure function over tensors.

Every method works on ΔW (the weighted deltas), never on A and B separately:
combining A's and B's separately adds cross terms Bⱼ·Aᵢ and is not the weighted
sum of the deltas. Factored methods (cat, linear, svd) never form ΔW densely;
the others get each adapter's dense ΔWᵢ = sᵢ·Bᵢ·Aᵢ (float32, in B@A
orientation) for one module at a time and return one dense tensor, which the
caller truncates to the requested rank with an SVD.

TIES here: prune each ΔWᵢ to its top-`density` magnitudes, elect each entry's
sign by the weighted mass Σ wᵢ·ΔWᵢ, keep the entries that agree, and divide
by the summed |wᵢ| of the agreeing adapters (mergekit's normalisation), so
weights are relative and an adapter of weight 0 changes nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import UnknownMergeMethod


@dataclass(frozen=True)
class Method:
    name: str
    dense: bool  # needs each adapter's dense ΔW
    params: tuple[str, ...]  # parameters it accepts besides weights
    fn: Callable | None  # (deltas, weights, density, generators) -> dense tensor
    doc: str


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"duplicate merge method {method.name!r}")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UnknownMergeMethod(name, METHODS)
    return METHODS[name]


def module_generator(seed: int, module: str, index: int) -> torch.Generator:
    """A generator per (seed, module, input): masks don't depend on processing order."""
    digest = hashlib.sha256(f"{int(seed)}\0{module}\0{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the round(density·n) largest-magnitude entries (ties broken by position), zero the rest."""
    n = t.numel()
    k = round(density * n)
    if k >= n:
        return t.clone()
    out = torch.zeros_like(t)
    if k <= 0:
        return out
    flat = t.reshape(-1)
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    out.view(-1)[idx] = flat[idx]
    return out


def dare(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability 1-density, rescale survivors by 1/density."""
    if density >= 1:
        return t.clone()
    if density <= 0:
        return torch.zeros_like(t)
    keep = torch.rand(t.shape, generator=generator, dtype=torch.float32) < density
    return torch.where(keep, t / density, torch.zeros_like(t))


def ties_combine(pruned: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Sign election by weighted mass, then the |w|-normalised sum of agreeing entries."""
    weighted = [w * p for p, w in zip(pruned, weights)]
    total = torch.stack(weighted).sum(0)
    sign = torch.sign(total)
    num = torch.zeros_like(total)
    den = torch.zeros_like(total)
    for wt, w in zip(weighted, weights):
        agree = (torch.sign(wt) == sign) & (wt != 0)
        num += torch.where(agree, wt, torch.zeros_like(wt))
        den += agree.to(torch.float32) * abs(w)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))


def _weighted_sum(tensors, weights):
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights):
        out.add_(t, alpha=w)
    return out


def _ties(deltas, weights, density, gens):
    return ties_combine([magnitude_prune(d, density) for d in deltas], weights)


def _dare_ties(deltas, weights, density, gens):
    return ties_combine([dare(d, density, g) for d, g in zip(deltas, gens)], weights)


def _dare_linear(deltas, weights, density, gens):
    return _weighted_sum([dare(d, density, g) for d, g in zip(deltas, gens)], weights)


def _magnitude_prune(deltas, weights, density, gens):
    return _weighted_sum([magnitude_prune(d, density) for d in deltas], weights)


register(Method("cat", False, (), None,
                "exact: concatenate ranks, weights folded into B; rank Σrᵢ"))
register(Method("linear", False, ("rank",), None,
                "Σ wᵢ·ΔWᵢ: exact via cat, or via svd when --rank is given"))
register(Method("svd", False, ("rank",), None,
                "Σ wᵢ·ΔWᵢ, truncated SVD to --rank (computed from the factors, never densely)"))
register(Method("ties", True, ("rank", "density"), _ties,
                "TIES: magnitude-prune each ΔWᵢ to --density, sign election, disjoint mean; then SVD"))
register(Method("dare_linear", True, ("rank", "density", "seed"), _dare_linear,
                "DARE: random drop (seeded) with rescale, then Σ wᵢ·ΔWᵢ; then SVD"))
register(Method("dare_ties", True, ("rank", "density", "seed"), _dare_ties,
                "DARE drop and rescale (seeded), then TIES sign election; then SVD"))
register(Method("magnitude_prune", True, ("rank", "density"), _magnitude_prune,
                "magnitude-prune each ΔWᵢ to --density, then Σ wᵢ·ΔWᵢ; then SVD"))
