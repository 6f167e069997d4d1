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
  them into one dense array, then a truncated SVD to the rank (numpy kernels in
  ``dense.py``; torch only draws DARE's seeded masks).

TIES here: prune each ΔWᵢ to its top-`density` magnitudes, elect each entry's
sign by the weighted mass Σ wᵢ·ΔWᵢ, keep the entries that agree, and divide
by the summed |wᵢ| of the agreeing adapters (mergekit's normalisation), so
weights are relative and an adapter of weight 0 changes nothing.

No torch at import: the merge methods are numpy only (`adapters merge
--into-adapter --method svd` starts without torch); DARE imports it for its masks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UnknownMergeMethod
from ..lora import LoraModule, as_numpy, factor_grams, frob_sq, stack_factors
from . import dense
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


# ---- dense: one module's ΔWᵢ at a time (numpy kernels in dense.py) -----------------------------

EXACT_SVD_MAX = dense.EXACT_SVD_MAX  # above this smaller dimension (and rank ≤ a quarter of it), randomised


def truncated_svd(d: torch.Tensor, k_max: int, seed: int):
    """(U, S, Vᴴ) holding at least the top ``k_max`` singular triplets of ``d`` (torch, for
    ``extract``): the full SVD of a small matrix; of a large one, a seeded randomised SVD
    (k_max + 16 directions, four power iterations), whose factors are orthonormal, so
    ‖U·S·Vᴴ‖² = Σ S² stays true."""
    import torch

    m = min(d.shape)
    if m <= EXACT_SVD_MAX or k_max * 4 > m:
        return torch.linalg.svd(d, full_matrices=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(d, q=min(m, k_max + 16), niter=4)
    return u, s, v.T


def module_generator(seed: int, module: str, index: int) -> torch.Generator:
    """A generator per (seed, module, input): masks don't depend on processing order."""
    import torch

    digest = hashlib.sha256(f"{int(seed)}\0{module}\0{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _np(t):
    return t.numpy() if hasattr(t, "numpy") else t


def magnitude_prune(t, density: float):
    """Keep the round(density·n) largest-magnitude entries (ties broken by position), zero the rest.
    A torch tensor in, a torch tensor out (a numpy array: numpy)."""
    out = dense.prune(_np(t), density)
    return _like(t, out)


def dare_mask(shape, density: float, generator: torch.Generator) -> np.ndarray | None:
    """Which entries DARE keeps (probability ``density``), drawn from the seeded generator."""
    import torch

    if density <= 0 or density >= 1:
        return None
    return (torch.rand(tuple(shape), generator=generator, dtype=torch.float32) < density).numpy()


def dare(t, density: float, generator: torch.Generator):
    """Drop each entry with probability 1-density, rescale survivors by 1/density."""
    x = _np(t)
    return _like(t, dense.dare(x, density, dare_mask(x.shape, density, generator)))


def ties_combine(pruned: list, weights: list[float]):
    """Sign election by weighted mass, then the |w|-normalised sum of agreeing entries."""
    return _like(pruned[0], dense.ties([_np(p) for p in pruned], weights))


def _like(t, out: np.ndarray):
    if isinstance(t, np.ndarray):
        return out
    import torch

    return torch.from_numpy(out)


def _delta(m: LoraModule) -> np.ndarray:
    """s·B·A in float32, (out, in) as B @ A comes out."""
    return as_numpy(m.B, np.float32) * np.float32(m.scale) @ as_numpy(m.A, np.float32)


def _dense(combine: Callable) -> Callable[[Group, Options], Combined]:
    """A dense method's ``fn``: ``combine(deltas, weights, density, module, seed, indices)`` ->
    one dense array (it consumes ``deltas``), then truncated to the rank; the report compares
    it (and its truncation) with the exact sum B·A."""

    def fn(g: Group, opt: Options) -> Combined:
        deltas = [_delta(m) for _, m, _ in g.mods]
        d = combine(deltas, [w for _, _, w in g.mods], opt.density, g.name, opt.seed, [i for i, _, _ in g.mods])
        a, b, kept, total = dense.truncate(d, opt.rank, opt.seed, g.name)
        exact_sq, err_sq, method_sq, dense_sq = dense.figures(g.a, g.b, d, a, b)
        energy = total if total is not None else dense_sq
        return Combined(a, b, exact_sq, err_sq, kept, energy, via="svd",
                        extra={"method_error": rel_error(exact_sq, method_sq)})

    fn.__name__ = combine.__name__.lstrip("_")
    return fn


def _drain(items: list):
    """Yield and drop the items of ``items`` one by one (one module's dense deltas are 46 MB
    each on a 1B model: each goes as soon as what replaces it exists)."""
    while items:
        yield items.pop(0)


def _dared(deltas, density, module, seed, indices):
    return [dense.dare(d, density, dare_mask(d.shape, density, module_generator(seed, module, i)))
            for d, i in zip(_drain(deltas), indices)]


def _ties(deltas, weights, density, module, seed, indices):
    return dense.ties([dense.prune(d, density) for d in _drain(deltas)], weights, own=True)


def _dare_ties(deltas, weights, density, module, seed, indices):
    return dense.ties(_dared(deltas, density, module, seed, indices), weights, own=True)


def _dare_linear(deltas, weights, density, module, seed, indices):
    return dense.weighted_sum(_dared(deltas, density, module, seed, indices), weights)


def _magnitude_prune(deltas, weights, density, module, seed, indices):
    return dense.weighted_sum([dense.prune(d, density) for d in _drain(deltas)], weights)


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
