"""Merge methods as data: one explicit METHODS dict, each entry a function over one module.

Every method works on ΔW (the weighted deltas), never on A and B separately:
combining A's and B's separately adds cross terms Bⱼ·Aᵢ and is not the weighted
sum of the deltas. A method's ``fn`` takes one module's :class:`Group` (every
input's factors stacked along the rank, wᵢ·sᵢ folded into B) and the options,
and returns a :class:`Combined`: the new factors and the figures the report needs.

* ``cat``, ``linear``, ``svd`` are factored: they never form ΔW densely.
  The truncated SVD of B·A comes from the small Gram matrices BᵀB and AAᵀ
  (R×R, R = Σrᵢ): their eigendecompositions give the R factors of B and Aᵀ
  (B = Q_b·R_b), the SVD of the small core R_b·R_aᵀ gives the singular values,
  and two GEMMs map the kept directions back. Float64 throughout, float32 out.
* ``ties``, ``dare_*``, ``magnitude_prune`` get each adapter's dense
  ΔWᵢ = sᵢ·Bᵢ·Aᵢ (float32, B@A orientation) for one module at a time, combine
  them into one dense tensor (torch), then a truncated SVD to the rank.

TIES here: prune each ΔWᵢ to its top-`density` magnitudes, elect each entry's
sign by the weighted mass Σ wᵢ·ΔWᵢ, keep the entries that agree, and divide
by the summed |wᵢ| of the agreeing adapters (mergekit's normalisation), so
weights are relative and an adapter of weight 0 changes nothing.

No torch at import: the factored methods are numpy only (`adapters merge
--into-adapter --method svd` starts without torch); the dense ones import it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UnknownMergeMethod
from ..lora import LoraModule, factor_grams, frob_sq, stack_factors
from .report import rel_error

if TYPE_CHECKING:
    import torch

GRAM_CUTOFF = 1e-13  # Gram eigenvalues below this share of the largest are null directions


@dataclass
class Options:
    rank: int | None
    density: float | None
    seed: int


@dataclass
class Group:
    """One module's inputs, stacked: A = [A₁; …; Aₖ] (R, in), B = [w₁s₁B₁ … wₖsₖBₖ] (out, R),
    float32 as the products will be; B @ A is the exact weighted sum of the deltas."""

    name: str
    mods: list[tuple[int, LoraModule, float]]  # (input index, module, weight)
    a: np.ndarray
    b: np.ndarray
    _grams: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def stack(cls, name: str, mods: list[tuple[int, LoraModule, float]]) -> Group:
        a, b = stack_factors([(m, w) for _, m, w in mods], numpy=True)
        return cls(name, mods, a, b)

    def grams(self) -> tuple[np.ndarray, np.ndarray]:
        """(AAᵀ, BᵀB) in float64, R×R: everything the factored methods need to know."""
        if self._grams is None:
            self._grams = factor_grams(self.a, self.b)
        return self._grams

    def input_norms(self) -> list[float]:
        """‖sᵢ·Bᵢ·Aᵢ‖_F of each input (without its weight): from the diagonal blocks of the
        stacked Grams when they exist (no extra work), else from each module."""
        if self._grams is None:
            return [m.delta_norm() for _, m, _ in self.mods]
        ga, gb = self._grams
        out, k0 = [], 0
        for _, m, w in self.mods:
            k1 = k0 + m.rank
            out.append(frob_sq(ga[k0:k1, k0:k1], gb[k0:k1, k0:k1]) ** 0.5 / abs(w))
            k0 = k1
        return out

@dataclass
class Combined:
    """One module's result: factors (A (k, in), B (out, k)) and ‖exact‖², ‖exact − result‖²,
    the kept and total energy of the truncation (squared singular values)."""

    a: np.ndarray
    b: np.ndarray
    exact_sq: float
    err_sq: float
    kept: float
    energy: float
    via: str
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    name: str
    dense: bool  # needs each adapter's dense ΔW
    params: tuple[str, ...]  # parameters it accepts besides weights
    fn: Callable[[Group, Options], Combined] | None
    doc: str
    default_rank: bool = True  # without --rank: the largest input rank (False: exact, no truncation)


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


# ---- factored: never a dense ΔW ----------------------------------------------------------------

def _half(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From G = XᵀX: (R, P) with X = (X·P)·R, X·P orthonormal. R = √Λ·Vᵀ, P = V/√Λ over the
    non-null eigenpairs (a rank-deficient stack, e.g. one adapter twice, loses nothing)."""
    lam, vec = np.linalg.eigh(gram)
    keep = lam > GRAM_CUTOFF * max(float(lam[-1]), 0.0)
    lam, vec = lam[keep], vec[:, keep]
    root = np.sqrt(lam)
    return root[:, None] * vec.T, vec / root


def factored_svd(a: np.ndarray, b: np.ndarray, rank: int, grams=None):
    """Truncated SVD of b @ a from the factors: (A' (k, in), B' (out, k), kept energy, total).

    B = Q_b·R_b and Aᵀ = Q_a·R_a with R from the R×R Grams; R_b·R_aᵀ = U·S·Wᵀ is the small
    core; then B' = B·P_b·U_k·√S_k and A' = √S_k·W_kᵀ·P_aᵀ·A (two GEMMs back, float64)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    ga, gb = grams if grams is not None else factor_grams(a64, b64)
    rb, pb = _half(gb)
    ra, pa = _half(ga)
    u, s, wt = np.linalg.svd(rb @ ra.T, full_matrices=False)
    k = max(0, min(rank, int(s.size)))
    root = np.sqrt(s[:k])
    b_out = b64 @ (pb @ (u[:, :k] * root))
    a_out = ((root[:, None] * wt[:k]) @ pa.T) @ a64
    total, kept = float(np.sum(s**2)), float(np.sum(s[:k] ** 2))
    return a_out.astype(np.float32), b_out.astype(np.float32), kept, total


def cat(g: Group, opt: Options) -> Combined:
    """Exact: the stacked factors themselves, rank Σrᵢ."""
    exact = frob_sq(*g.grams())
    return Combined(g.a, g.b, exact, 0.0, exact, exact, via="cat")


def svd(g: Group, opt: Options) -> Combined:
    """The exact sum, truncated to ``rank`` from its factors."""
    a, b, kept, energy = factored_svd(g.a, g.b, opt.rank, g.grams())
    return Combined(a, b, energy, max(energy - kept, 0.0), kept, energy, via="svd")


def linear(g: Group, opt: Options) -> Combined:
    """Σ wᵢ·ΔWᵢ: exact (cat) without a rank, else truncated (svd)."""
    return cat(g, opt) if opt.rank is None else svd(g, opt)


# ---- dense: one module's ΔWᵢ at a time, in torch ------------------------------------------------

def module_generator(seed: int, module: str, index: int) -> torch.Generator:
    """A generator per (seed, module, input): masks don't depend on processing order."""
    import torch

    digest = hashlib.sha256(f"{int(seed)}\0{module}\0{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the round(density·n) largest-magnitude entries (ties broken by position), zero the rest."""
    import torch

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
    import torch

    if density >= 1:
        return t.clone()
    if density <= 0:
        return torch.zeros_like(t)
    keep = torch.rand(t.shape, generator=generator, dtype=torch.float32) < density
    return torch.where(keep, t / density, torch.zeros_like(t))


def ties_combine(pruned: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Sign election by weighted mass, then the |w|-normalised sum of agreeing entries."""
    import torch

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
    import torch

    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights):
        out.add_(t, alpha=w)
    return out


EXACT_SVD_MAX = 1024  # above this smaller dimension (and rank ≤ a quarter of it), a seeded randomised SVD


def truncated_svd(d: torch.Tensor, k_max: int, seed: int):
    """(U, S, Vᴴ) holding at least the top ``k_max`` singular triplets of ``d``: the full SVD
    of a small matrix; of a large one, a seeded randomised SVD (k_max + 16 directions, four
    power iterations), whose factors are orthonormal, so ‖U·S·Vᴴ‖² = Σ S² stays true."""
    import torch

    m = min(d.shape)
    if m <= EXACT_SVD_MAX or k_max * 4 > m:
        return torch.linalg.svd(d, full_matrices=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(d, q=min(m, k_max + 16), niter=4)
    return u, s, v.T


def dense_svd(d: torch.Tensor, rank: int, seed: int = 0):
    """Truncation of a dense tensor to ``rank``: (A', B', kept energy, total energy), float32 numpy.
    The total is ‖d‖², whichever SVD ran."""
    import torch

    d64 = d.to(torch.float64)
    u, s, vh = truncated_svd(d64, rank, seed)
    k = max(0, min(rank, int(s.numel())))
    full = int(s.numel()) == min(d64.shape)
    total = float((s**2).sum()) if full else float(torch.linalg.vector_norm(d64) ** 2)
    root = s[:k].sqrt()
    b = (u[:, :k] * root).to(torch.float32).numpy()
    a = (root[:, None] * vh[:k]).to(torch.float32).numpy()
    return a, b, float((s[:k] ** 2).sum()), total


def _dense(combine: Callable) -> Callable[[Group, Options], Combined]:
    """A dense method's ``fn``: ``combine(deltas, weights, density, generators)`` -> one dense
    tensor, then truncated by SVD; the report compares it (and its truncation) with the exact sum."""

    def fn(g: Group, opt: Options) -> Combined:
        import torch

        exact = torch.from_numpy(g.b).to(torch.float64) @ torch.from_numpy(g.a).to(torch.float64)
        deltas = [m.delta(orient=False) for _, m, _ in g.mods]
        gens = [module_generator(opt.seed, g.name, i) for i, _, _ in g.mods]
        dense = combine(deltas, [w for _, _, w in g.mods], opt.density, gens)
        a, b, kept, energy = dense_svd(dense, opt.rank, opt.seed)
        approx = torch.from_numpy(b).to(torch.float64) @ torch.from_numpy(a).to(torch.float64)
        exact_sq = float((exact**2).sum())
        method_err = rel_error(exact_sq, float(((exact - dense.to(torch.float64)) ** 2).sum()))
        return Combined(a, b, exact_sq, float(((exact - approx) ** 2).sum()), kept, energy, via="svd",
                        extra={"method_error": method_err})

    fn.__name__ = combine.__name__.lstrip("_")
    return fn


def _ties(deltas, weights, density, gens):
    return ties_combine([magnitude_prune(d, density) for d in deltas], weights)


def _dare_ties(deltas, weights, density, gens):
    return ties_combine([dare(d, density, g) for d, g in zip(deltas, gens)], weights)


def _dare_linear(deltas, weights, density, gens):
    return _weighted_sum([dare(d, density, g) for d, g in zip(deltas, gens)], weights)


def _magnitude_prune(deltas, weights, density, gens):
    return _weighted_sum([magnitude_prune(d, density) for d in deltas], weights)


register(Method("cat", False, (), cat,
                "exact: concatenate ranks, weights folded into B; rank Σrᵢ", default_rank=False))
register(Method("linear", False, ("rank",), linear,
                "Σ wᵢ·ΔWᵢ: exact via cat, or via svd when --rank is given", default_rank=False))
register(Method("svd", False, ("rank",), svd,
                "Σ wᵢ·ΔWᵢ, truncated SVD to --rank (computed from the factors, never densely)"))
register(Method("ties", True, ("rank", "density"), _dense(_ties),
                "TIES: magnitude-prune each ΔWᵢ to --density, sign election, disjoint mean; then SVD"))
register(Method("dare_linear", True, ("rank", "density", "seed"), _dense(_dare_linear),
                "DARE: random drop (seeded) with rescale, then Σ wᵢ·ΔWᵢ; then SVD"))
register(Method("dare_ties", True, ("rank", "density", "seed"), _dense(_dare_ties),
                "DARE drop and rescale (seeded), then TIES sign election; then SVD"))
register(Method("magnitude_prune", True, ("rank", "density"), _dense(_magnitude_prune),
                "magnitude-prune each ΔWᵢ to --density, then Σ wᵢ·ΔWᵢ; then SVD"))
