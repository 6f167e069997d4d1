"""Our LoRA wrapper: y = base(x) + s · B(A(dropout(x))), with PEFT's names and init.

One adapter per module, nothing else: the wrapper keeps the frozen base layer
as ``base_layer`` and the trainable factors as ``lora_A`` / ``lora_B``
(``nn.Linear`` for Linear and GPT-2's Conv1D, plain parameters
``lora_embedding_A`` / ``lora_embedding_B`` for Embedding), the layout PEFT
uses, so a state dict maps onto a PEFT folder one to one.

Initialisation follows PEFT exactly, including the order in which it draws
from the RNG (A and B are built as ``nn.Linear`` first, then A is re-drawn
with kaiming-uniform(a=√5) and B zeroed): for the same seed our adapter starts
bit-identical to ``get_peft_model``'s. Embeddings follow PEFT too: A = 0,
B ~ N(0, 1).

DoRA (``dora=True``, PEFT's ``use_dora``) adds a trainable magnitude m per output feature,
initialised as PEFT does to ‖W + s·B·A‖ (= ‖W‖ row-wise, B being zero; peft/tuners/lora/dora.py,
DoraLinearLayer.update_layer / get_weight_norm), and computes PEFT's forward
(DoraLinearLayer.forward): with g = m / ‖W + s·B·A‖ (the norm detached from the graph),
y = base(x) + (g − 1)·(W x) + g·s·B(A(dropout(x))), where W x excludes the base bias and is
recomputed on the dropped-out input when dropout is active in training.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ..errors import AdapterHubError, ShapeMismatch
from ..lora import LoraModule, as_torch, module_rank_alpha, scaling
from ..peft_format import LoraAdapter, lora_config


class TargetError(AdapterHubError):
    """--targets names no module of this model, or one we cannot adapt."""


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return ()
    return Conv1D


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    conv1d = _conv1d_class()
    if conv1d and isinstance(module, conv1d):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


class LoraLayer(nn.Module):
    """Wraps one Linear / Conv1D / Embedding. ``enabled=False`` gives the base output."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, dora: bool = False):
        super().__init__()
        kind = _kind(base)
        if kind is None:
            raise TargetError(f"cannot put LoRA on a {type(base).__name__}")
        if dora and kind == "embedding":
            raise TargetError("DoRA training on an Embedding is not supported",
                              "target Linear / Conv1D layers with --dora")
        self.base_layer = base
        self.kind = kind
        self.r, self.alpha, self.use_rslora = int(r), float(alpha), bool(use_rslora)
        self.scale = scaling(self.r, self.alpha, self.use_rslora)
        self.enabled = True
        w = base.weight
        if kind == "embedding":
            self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
            num, dim = w.shape
            # PEFT draws randn for both, then re-initialises: A zeros, B normal
            a = torch.randn((r, num))
            b = torch.randn((dim, r))
            self.lora_embedding_A = nn.Parameter(a.zero_())
            self.lora_embedding_B = nn.Parameter(nn.init.normal_(b))
        else:
            inn, out = (w.shape[1], w.shape[0]) if kind == "linear" else (w.shape[0], w.shape[1])
            self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
            self.lora_A = nn.Linear(inn, r, bias=False)
            self.lora_B = nn.Linear(r, out, bias=False)
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        self.lora_magnitude_vector = None
        for p in self.lora_parameters():
            p.data = p.data.to(device=w.device, dtype=torch.float32)
        if dora:
            with torch.no_grad():
                self.lora_magnitude_vector = nn.Parameter(self._weight_norm())
        base.requires_grad_(False)

    def _weight_norm(self) -> torch.Tensor:
        """‖W + s·B·A‖ per output feature, float32 (PEFT's get_weight_norm, weight (out, in))."""
        w = self.base_layer.weight.float()
        if self.kind == "conv1d":
            w = w.T
        a, b = self.lora_A.weight, self.lora_B.weight
        return torch.linalg.norm(w + self.scale * (b @ a), dim=1)

    def lora_parameters(self) -> list[nn.Parameter]:
        if self.kind == "embedding":
            return [self.lora_embedding_A, self.lora_embedding_B]
        mag = [self.lora_magnitude_vector] if self.lora_magnitude_vector is not None else []
        return [self.lora_A.weight, self.lora_B.weight, *mag]

    @property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in PEFT's layout."""
        if self.kind == "embedding":
            return self.lora_embedding_A, self.lora_embedding_B
        return self.lora_A.weight, self.lora_B.weight

    def forward(self, x, *args, **kwargs):
        result = self.base_layer(x, *args, **kwargs)
        if not self.enabled:
            return result
        if self.kind == "embedding":
            emb = self.base_layer
            after_a = nn.functional.embedding(
                x, self.lora_embedding_A.T, emb.padding_idx, emb.max_norm, emb.norm_type,
                emb.scale_grad_by_freq, emb.sparse,
            )
            return result + (after_a @ self.lora_embedding_B.T) * self.scale
        a = self.lora_A.weight
        h = self.lora_dropout(x)
        if h.dtype != a.dtype and not torch.is_autocast_enabled(h.device.type):
            h = h.to(a.dtype)
        if self.lora_magnitude_vector is not None:
            return result + self._dora_extra(x, h, result).to(result.dtype)
        # s·B(A x) with s applied to the r-wide intermediate: same product, r/out of the work
        lora = self.lora_B(self.lora_A(h) * self.scale)
        return result + lora.to(result.dtype)

    def _dora_extra(self, x, h, result):
        """PEFT's DoraLinearLayer.forward: (g − 1)·(W x) + g·s·B(A(h)), g = m / ‖W + s·B·A‖."""
        g = self.lora_magnitude_vector / self._weight_norm().detach()
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base = result
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None:
                base = base - bias
        else:  # dropout active: W applied to the dropped-out input, as PEFT does
            w = self.base_layer.weight
            base = nn.functional.linear(h.to(w.dtype), w.T if self.kind == "conv1d" else w)
        lora = self.lora_B(self.lora_A(h)) * self.scale
        return (g - 1) * base.to(g.dtype) + g * lora

    def extra_repr(self) -> str:
        return f"kind={self.kind}, r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}"


# --- choosing targets -------------------------------------------------------------


def linear_module_names(model: nn.Module) -> list[str]:
    """Short names of every Linear/Conv1D except the output embedding (PEFT's all-linear)."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, mod in model.named_modules():
        if mod is out_emb or _kind(mod) not in ("linear", "conv1d"):
            continue
        short = name.rsplit(".", 1)[-1]
        if short not in names:
            names.append(short)
    return names


def resolve_targets(model: nn.Module, targets) -> list[str]:
    """Full module names to adapt. ``targets``: "all-linear", a list of short names or
    dotted suffixes ("q_proj", "self_attn.q_proj"), or a comma-separated string."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = list(targets or [])
    if not targets:
        raise TargetError("--targets is empty", "e.g. --targets q_proj,v_proj or all-linear")
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if targets == ["all-linear"]:
        chosen = [n for n, m in model.named_modules()
                  if _kind(m) in ("linear", "conv1d") and m is not out_emb]
        if not chosen:
            raise TargetError("all-linear: this model has no Linear/Conv1D layers to adapt")
        return chosen
    chosen, unmatched = [], []
    for t in targets:
        hits = [n for n, m in model.named_modules() if (n == t or n.endswith("." + t)) and n]
        if not hits:
            unmatched.append(t)
        for n in hits:
            mod = model.get_submodule(n)
            if _kind(mod) is None:
                raise TargetError(
                    f"--targets {t}: {n} is a {type(mod).__name__}; LoRA goes on Linear, Conv1D "
                    "or Embedding layers")
            if n not in chosen:
                chosen.append(n)
    if unmatched:
        valid = linear_module_names(model)
        raise TargetError(
            f"--targets: no module named {', '.join(unmatched)} in this model",
            f"linear layers here: {', '.join(valid)}; or use all-linear")
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(chosen, key=order.__getitem__)  # PEFT's order: RNG draws line up


def inject_lora(model: nn.Module, targets, r: int = 16, alpha: float = 32, dropout: float = 0.0,
                use_rslora: bool = False, rank_pattern: dict | None = None,
                alpha_pattern: dict | None = None, dora: bool = False) -> dict[str, LoraLayer]:
    """Freeze every base parameter and wrap the target modules; returns {name: LoraLayer}."""
    if r <= 0:
        raise TargetError(f"--rank must be positive, got {r}")
    names = resolve_targets(model, targets)
    model.requires_grad_(False)
    cfg = {"r": r, "lora_alpha": alpha, "rank_pattern": rank_pattern or {},
           "alpha_pattern": alpha_pattern or {}}
    layers: dict[str, LoraLayer] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if isinstance(base, LoraLayer):
            raise TargetError(f"{name} already has a LoRA layer")
        mr, ma = module_rank_alpha(cfg, name)
        layer = LoraLayer(base, mr, ma, dropout, use_rslora, dora=dora)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors only, keyed by our module names (cheap to checkpoint)."""
    out = {}
    for name, layer in lora_layers(model).items():
        a, b = layer.factors
        out[f"{name}.A"] = a
        out[f"{name}.B"] = b
    return out


def short_targets(names) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def extract_adapter(model: nn.Module, *, base_model_name_or_path: str | None = None,
                    dropout: float = 0.0, target_modules=None, dtype=torch.float32) -> LoraAdapter:
    """The model's LoRA layers as a ``LoraAdapter`` ready for ``save_adapter``."""
    layers = lora_layers(model)
    if not layers:
        raise AdapterHubError("this model has no LoRA layers")
    first = next(iter(layers.values()))
    r, alpha, rslora = first.r, first.alpha, first.use_rslora
    rank_pattern = {n: l.r for n, l in layers.items() if l.r != r}
    alpha_pattern = {n: l.alpha for n, l in layers.items() if l.alpha != alpha}
    kinds = {l.kind for l in layers.values()}
    fifo = "conv1d" in kinds
    dora = {l.lora_magnitude_vector is not None for l in layers.values()}
    if len(dora) > 1:
        raise TargetError("cannot save DoRA and plain LoRA layers in one PEFT adapter")
    if fifo and "linear" in kinds:
        # PEFT keeps one fan_in_fan_out per config; mixing would make the folder lie
        raise TargetError("cannot save LoRA on both Linear and Conv1D layers in one PEFT adapter",
                          "choose targets of one kind")
    # Full module paths anchored at the start would break PEFT's suffix match, so store
    # the short names when they are unambiguous, the full names otherwise.
    if target_modules is None:
        shorts = short_targets(layers)
        exact = {n for n, m in model.named_modules()
                 if n.rsplit(".", 1)[-1] in shorts and (isinstance(m, LoraLayer))}
        target_modules = shorts if exact == set(layers) else sorted(layers)
    cfg = lora_config(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
        use_rslora=rslora, fan_in_fan_out=fifo, rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern, base_model_name_or_path=base_model_name_or_path,
        task_type="CAUSAL_LM", use_dora=dora.pop(),
    )
    modules = {}
    for name, layer in layers.items():
        a, b = layer.factors
        modules[name] = LoraModule(
            name=name, A=a.detach().to("cpu", dtype).contiguous().clone(),
            B=b.detach().to("cpu", dtype).contiguous().clone(), scale=layer.scale,
            kind="embedding" if layer.kind == "embedding" else "linear",
            fan_in_fan_out=layer.kind == "conv1d", r=layer.r, alpha=layer.alpha,
            magnitude=None if layer.lora_magnitude_vector is None else
            layer.lora_magnitude_vector.detach().to("cpu", dtype).contiguous().clone(),
        )
    return LoraAdapter(config=cfg, modules=modules)


def _check_compatible(model: nn.Module, adapter: LoraAdapter) -> None:
    if adapter.experts:
        raise TargetError("LoRA on MoE expert parameters (target_parameters) cannot be applied in memory here",
                          "merge it into the base: adapters merge BASE_DIR REF --out DIR")
    for name, mod in adapter.modules.items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise TargetError(f"adapter module {name} does not exist in this model",
                              "was it trained on a different base?") from None
        if isinstance(base, LoraLayer):
            base = base.base_layer
        kind = _kind(base)
        if kind is None:
            raise TargetError(f"adapter module {name} is a {type(base).__name__} here")
        w = tuple(base.weight.shape)
        if tuple(mod.delta_shape) != w:
            raise ShapeMismatch(name, w, mod.delta_shape)
        if (kind == "conv1d") != bool(mod.fan_in_fan_out) and kind != "embedding":
            raise TargetError(f"adapter module {name}: fan_in_fan_out does not match a {kind}")


def load_lora_weights(model: nn.Module, adapter: LoraAdapter) -> None:
    """Copy an adapter's factors into already-injected layers (shapes must agree)."""
    layers = lora_layers(model)
    missing = set(adapter.modules) ^ set(layers)
    if missing:
        raise TargetError(f"adapter and model disagree on LoRA modules: {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, mod in adapter.modules.items():
            a, b = layers[name].factors
            if tuple(a.shape) != tuple(mod.A.shape) or tuple(b.shape) != tuple(mod.B.shape):
                raise ShapeMismatch(name, tuple(a.shape) + tuple(b.shape),
                                    tuple(mod.A.shape) + tuple(mod.B.shape))
            a.copy_(as_torch(mod.A))
            b.copy_(as_torch(mod.B))
            mag = layers[name].lora_magnitude_vector
            if (mag is None) != (mod.magnitude is None):
                raise TargetError(f"{name}: adapter and model disagree on DoRA")
            if mag is not None:
                mag.copy_(as_torch(mod.magnitude))


def apply_adapter(model: nn.Module, adapter: LoraAdapter, dropout: float = 0.0) -> dict[str, LoraLayer]:
    """Put an existing adapter on ``model`` (frozen base + our LoRA layers; returns them).

    The model computes W x + s·B A x on the fly; ``remove_adapter`` undoes it.
    Use ``adapter_applied`` for a scoped version.
    """
    if adapter.extra:
        raise TargetError(
            f"adapter has whole replacement tensors (modules_to_save: {sorted(adapter.extra)[:3]})",
            "merge it with `adapters merge` instead")
    _check_compatible(model, adapter)
    model.requires_grad_(False)
    layers = {}
    for name, mod in adapter.modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if isinstance(base, LoraLayer):
            raise TargetError(f"{name} already has a LoRA layer", "remove_adapter(model) first")
        rslora = bool(adapter.config.get("use_rslora"))
        if mod.magnitude is not None and mod.kind == "embedding":
            raise TargetError(f"{name}: applying a DoRA embedding in memory is not supported",
                              "merge it into the base: adapters merge BASE_DIR REF --out DIR")
        layer = LoraLayer(base, mod.rank, mod.alpha if mod.alpha is not None else mod.rank,
                          dropout, rslora, dora=mod.magnitude is not None)
        layer.scale = mod.scale  # trust the adapter's own scaling (rank/alpha patterns)
        with torch.no_grad():
            a, b = layer.factors
            a.copy_(as_torch(mod.A).to(torch.float32))
            b.copy_(as_torch(mod.B).to(torch.float32))
            if mod.magnitude is not None:
                layer.lora_magnitude_vector.copy_(as_torch(mod.magnitude).to(torch.float32))
        layer.requires_grad_(False)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def remove_adapter(model: nn.Module) -> None:
    """Unwrap every LoraLayer, putting the base layers back."""
    for name, layer in list(lora_layers(model).items()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)


@contextlib.contextmanager
def adapter_applied(model: nn.Module, adapter: LoraAdapter):
    """``with adapter_applied(model, adapter): model(...)``: the adapter only inside the block."""
    apply_adapter(model, adapter)
    try:
        yield model
    finally:
        remove_adapter(model)


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    for layer in lora_layers(model).values():
        layer.enabled = enabled


