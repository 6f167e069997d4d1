"""The LoRA math, in one place, with PEFT's names.

PEFT stores per module ``lora_A`` (r, in) and ``lora_B`` (out, r); the update is
ΔW = s · B @ A with s = alpha / r (rsLoRA: alpha / sqrt(r)), transposed for
weights stored (in, out) (``fan_in_fan_out``, GPT-2's Conv1D) and for embeddings,
whose factors are ``lora_embedding_A`` (r, num_embeddings) and
``lora_embedding_B`` (dim, r). The seed text's W' = W + AB is the same update
with the other orientation; everything here uses the PEFT names.

All arithmetic is float32; callers cast once at the end. Factors are numpy arrays as
``peft_format.load_adapter`` reads them, or torch tensors where the trainer and the adapter
algebra made them; ``as_torch`` turns an array into a tensor without a copy, and only the
methods that do torch math import torch.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import PatternError

if TYPE_CHECKING:
    import torch


def as_torch(x):
    """A torch tensor sharing ``x``'s memory (``torch.from_numpy``); tensors pass through."""
    import numpy as np

    if isinstance(x, np.ndarray):
        import torch

        return torch.from_numpy(x)
    return x


def as_numpy(x, dtype=None):
    """A numpy array of ``x`` (a torch tensor is detached and moved to the CPU, bf16 upcast)."""
    import numpy as np

    if not isinstance(x, np.ndarray):
        import torch

        x = x.detach().cpu()
        x = (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return x if dtype is None else np.asarray(x, dtype=dtype)


MAX_PATTERN = 1000  # characters in one rank_pattern / alpha_pattern key


@functools.lru_cache(maxsize=4096)
def suffix_regex(key: str):
    r"""PEFT's rank_pattern / alpha_pattern rule, compiled for a linear-time engine.

    PEFT 0.21 (peft/utils/other.py, ``get_pattern_key``) takes the first key K for which
    ``re.match(rf"(.*\.)?({K})$", module)`` matches. A key is user data: with Python's
    backtracking engine ``(a+)+$`` against a long name never finishes. We match the same
    spliced pattern with RE2, whose time is linear in the name; a key that Python rejects,
    or that needs a feature RE2 does not run (lookaround, backreferences, atomic groups,
    possessive quantifiers, ``\Z``) is a PatternError, one line. ``\n?`` keeps Python's
    ``$``, which also matches before a final newline.
    """
    if not isinstance(key, str):
        raise PatternError(key, "a pattern must be a string")
    if len(key) > MAX_PATTERN:
        raise PatternError(key, f"longer than {MAX_PATTERN} characters")
    spliced = rf"(.*\.)?({key})$"
    try:
        re.compile(spliced)  # what PEFT itself would accept (compiling does not backtrack)
    except (re.error, RecursionError, OverflowError) as e:
        why = str(e)
        try:  # the key's own error reads better (positions in the key, not in the splice)
            re.compile(key)
        except (re.error, RecursionError, OverflowError) as own:
            why = str(own)
        raise PatternError(key, f"not a valid regular expression ({why})") from None
    if "{," in key:  # Python reads a{,3} as a{0,3}, RE2 as literal text: refuse the ambiguity
        raise PatternError(key, "uses {,n}; write {0,n}")
    try:
        import re2
    except ImportError:  # no RE2 on this platform: literal names (with \. and |) only
        if re.fullmatch(r"(?:[\w\-]|\\\.|\.|\|)*", key):
            return re.compile(spliced)
        raise PatternError(
            key, "needs google-re2 (pip install google-re2) to be matched in bounded time"
        ) from None
    options = re2.Options()
    options.log_errors = False  # RE2 would print its own line to stderr
    try:
        return re2.compile(rf"(.*\.)?({key})\n?$", options=options)
    except Exception as e:  # re2's error type is private
        why = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        raise PatternError(key, f"cannot be matched in bounded time ({why}; lookaround, "
                           "backreferences and atomic groups are not supported)") from None


def pattern_key(patterns, module: str) -> str | None:
    """PEFT's suffix-regex match: the first key K with ``(.*\\.)?(K)$`` matching ``module``
    (in time linear in ``module``: see ``suffix_regex``)."""
    for key in patterns:
        if suffix_regex(key).match(module):
            return key
    return None


def module_rank_alpha(config: dict, module: str) -> tuple[int, float]:
    """(r, alpha) of one module, honouring ``rank_pattern`` / ``alpha_pattern``."""
    r = config.get("r", 8)
    alpha = config.get("lora_alpha", 8)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    key = pattern_key(rank_pattern, module)
    if key is not None:
        r = rank_pattern[key]
    key = pattern_key(alpha_pattern, module)
    if key is not None:
        alpha = alpha_pattern[key]
    return int(r), float(alpha)


def factor_grams(a, b):
    """(A·Aᵀ, Bᵀ·B) in float64, r×r each (numpy or torch factors in): all the factored
    methods need to know about B·A."""
    import numpy as np

    a, b = as_numpy(a, np.float64), as_numpy(b, np.float64)
    return a @ a.T, b.T @ b


def frob_sq(ga, gb) -> float:
    """‖B·A‖²_F = tr((AAᵀ)(BᵀB)) from the Gram matrices (never forms B·A)."""
    import numpy as np

    return max(float(np.sum(ga * gb)), 0.0)


def factored_sq_norm(a, b) -> float:
    """‖B·A‖²_F from the factors: r×r work, float64."""
    return frob_sq(*factor_grams(a, b))


def scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@dataclass
class LoraModule:
    """One adapted module: factors in PEFT layout plus how to turn them into ΔW."""

    name: str  # module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
    A: torch.Tensor  # (r, in); embedding: (r, num_embeddings)  (or a numpy array)
    B: torch.Tensor  # (out, r); embedding: (dim, r)
    scale: float
    kind: str = "linear"  # "linear" | "embedding"
    fan_in_fan_out: bool = False
    bias: torch.Tensor | None = None  # lora_B.bias, shape (out,)
    r: int | None = None
    alpha: float | None = None
    # DoRA (use_dora): lora_magnitude_vector, one value per output feature (out,); embedding: (dim,)
    magnitude: torch.Tensor | None = None
    # MoE expert LoRA on a fused 3-D base tensor (experts.py): ``param`` is that tensor's key and
    # ΔW (in the orientation above) is its slice [expert]
    param: str | None = None
    expert: int | None = None

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def transposed(self) -> bool:
        return self.kind == "embedding" or self.fan_in_fan_out

    @property
    def weight_key(self) -> str:
        return self.param or f"{self.name}.weight"

    @property
    def bias_key(self) -> str:
        return f"{self.name}.bias"

    @property
    def delta_shape(self) -> tuple[int, int]:
        out, inn = int(self.B.shape[0]), int(self.A.shape[1])
        return (inn, out) if self.transposed else (out, inn)

    def delta(self, weight: float = 1.0, orient: bool = True) -> torch.Tensor:
        """weight · s · B @ A in float32, in the base weight's orientation (``orient=False``:
        always (out, in), as B @ A comes out)."""
        import torch

        a = as_torch(self.A).to(torch.float32)
        b = as_torch(self.B).to(torch.float32) * (self.scale * weight)
        return orient_delta(b @ a, self.transposed and orient)

    def bias_delta(self, weight: float = 1.0) -> torch.Tensor | None:
        if self.bias is None:
            return None
        import torch

        return as_torch(self.bias).to(torch.float32) * (self.scale * weight)

    def delta_norm(self) -> float:
        """‖s·B·A‖_F without forming ΔW: ‖BA‖² = tr((AAᵀ)(BᵀB)), r×r work."""
        return abs(self.scale) * math.sqrt(factored_sq_norm(self.A, self.B))

    def num_parameters(self) -> int:
        n = math.prod(self.A.shape) + math.prod(self.B.shape)
        n += math.prod(self.magnitude.shape) if self.magnitude is not None else 0
        return n + (math.prod(self.bias.shape) if self.bias is not None else 0)


def orient_delta(d, transposed: bool):
    """B @ A comes out (out, in); weights stored (in, out) (fan_in_fan_out, embeddings)
    take Dᵀ."""
    return d.T if transposed else d


def stack_factors(modules: list[tuple[LoraModule, float]], numpy: bool = False):
    """The factors of Σ wᵢ·sᵢ·BᵢAᵢ as one pair, float32, the weights folded into B:
    A = [A₁; …; Aₖ] (Σr, in) and B = [w₁s₁B₁ … wₖsₖBₖ] (out, Σr): the sum is B @ A exactly.
    torch tensors, or with ``numpy`` numpy arrays (one A is returned without a copy)."""
    if numpy:
        import numpy as np

        f32 = [as_numpy(m.A, np.float32) for m, _ in modules]
        a = np.concatenate(f32, axis=0) if len(f32) > 1 else np.ascontiguousarray(f32[0])
        b = np.concatenate([as_numpy(m.B, np.float32) * np.float32(m.scale * w)
                            for m, w in modules], axis=1)
        return a, b
    import torch

    a = torch.cat([as_torch(m.A).to(torch.float32) for m, _ in modules], dim=0)
    b = torch.cat([as_torch(m.B).to(torch.float32) * (m.scale * w) for m, w in modules], dim=1)
    return a, b


def stacked_delta(modules: list[tuple[LoraModule, float]]) -> torch.Tensor:
    """Σ wᵢ·sᵢ·BᵢAᵢ as ONE float32 product [w₁s₁B₁ … wₖsₖBₖ] @ [A₁; …; Aₖ].

    One (out, Σr) @ (Σr, in) matmul beats k separate products and sums
    in float32 before any cast. All modules must share orientation and shape.
    """
    if len(modules) == 1:
        mod, w = modules[0]
        return mod.delta(w)
    first = modules[0][0]
    shape = first.delta_shape
    for mod, _ in modules:
        if mod.delta_shape != shape or mod.transposed != first.transposed:
            raise ValueError(f"{mod.name}: cannot stack deltas of different shapes")
    a, b = stack_factors(modules)
    return orient_delta(b @ a, first.transposed)
