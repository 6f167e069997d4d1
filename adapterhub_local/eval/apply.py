"""Apply LoRA adapters to a loaded model in memory, exactly, and put the weights back.

Each adapted module's weight becomes W + Σ wᵢ·ΔWᵢ, ΔW = s·B·A from ``peft_format``
(orientation handled by ``LoraModule.delta``), summed in one float32 product
(``lora.stacked_delta``); ``lora_B.bias``, ``modules_to_save`` and tied embeddings
behave as in PEFT. Used by ``adapters eval`` and ``adapters sweep``.
"""

from __future__ import annotations

import contextlib

from ..errors import InvalidAdapter, ShapeMismatch
from ..lora import as_torch


def _untie_if_needed(model, keys: set[str]) -> bool:
    """Give lm_head its own weight when an adapter touches one half of a tied pair,
    as PEFT does: a LoRA on embed_tokens does not change a tied lm_head, and back."""
    import torch

    out_emb = model.get_output_embeddings()
    in_emb = model.get_input_embeddings()
    if out_emb is None or in_emb is None or out_emb.weight is not in_emb.weight:
        return False
    tied = {n for n, p in model.state_dict(keep_vars=True).items() if p is in_emb.weight}
    if not tied & keys:
        return False
    out_emb.weight = torch.nn.Parameter(in_emb.weight.detach().clone(), requires_grad=False)
    return True


@contextlib.contextmanager
def applied(model, adapters: list[tuple[object, float]]):
    """Within the block, ``model`` computes with W + Σ wᵢ·ΔWᵢ for every adapted module.

    ``adapters`` are (LoraAdapter, weight) pairs. The deltas of all adapters on a
    module are summed in one float32 product; the original weights come back on exit.
    ``modules_to_save`` tensors replace the base tensor (two adapters replacing the
    same tensor is an error).
    """
    import torch

    keys: set[str] = set()
    for adapter, _ in adapters:
        if adapter.dora_modules or adapter.experts:  # not W + Σ wᵢ·ΔWᵢ on module weights (variants.py)
            from ..errors import UnsupportedAdapter

            raise UnsupportedAdapter(adapter.path or "adapter", "DoRA or MoE expert adapter: applying it in "
                                     "memory is not supported",
                                     "merge it into the base (adapters merge BASE_DIR REF --out DIR) and "
                                     "evaluate the merged model")
        keys.update(m.weight_key for m in adapter.modules.values())
        keys.update(adapter.extra)
    retie = _untie_if_needed(model, keys)
    patch = _Patch(model)
    try:
        with torch.no_grad():
            by_module: dict[str, list] = {}
            for adapter, w in adapters:
                for name, mod in adapter.modules.items():
                    by_module.setdefault(name, []).append((mod, float(w), adapter.path))
            for name, items in by_module.items():
                patch.add_delta(name, items)
            patch.replace_extra(adapters)
        yield model
    finally:
        patch.restore()
        if retie:
            model.get_output_embeddings().weight = model.get_input_embeddings().weight


class _Patch:
    """The model's tensors changed in place, with their originals to put back."""

    def __init__(self, model):
        self.model = model
        self.state = model.state_dict(keep_vars=True)
        self.saved: dict[str, object] = {}
        self.added_bias: list = []

    def target(self, key: str, where):
        if key not in self.state:
            raise InvalidAdapter(where, f"targets {key}, which the model does not have",
                                 "this adapter was trained for a different base model")
        return self.state[key]

    def _keep(self, key: str, tensor) -> None:
        self.saved.setdefault(key, tensor.detach().clone())

    def add_delta(self, name: str, items: list) -> None:
        """W += Σ wᵢ·ΔWᵢ of every (module, weight, path) on this module, then the biases."""
        mod0, where0 = items[0][0], items[0][2]
        param = self.target(mod0.weight_key, where0)
        if tuple(param.shape) != tuple(mod0.delta_shape):
            raise ShapeMismatch(name, param.shape, mod0.delta_shape, str(where0 or ""))
        delta = _stacked([(m, w) for m, w, _ in items])
        self._keep(mod0.weight_key, param)
        param.add_(delta.to(param.dtype))
        for m, w, where in items:
            bd = m.bias_delta(w)
            if bd is not None:
                self._add_bias(m, bd, param.dtype, where)

    def _add_bias(self, m, bd, dtype, where) -> None:
        import torch

        if m.bias_key not in self.state:
            # lora_bias on a layer without a bias: PEFT adds s·b in forward, so
            # give the layer a zero bias for the duration (removed on exit)
            layer = self.model.get_submodule(m.name)
            if getattr(layer, "bias", 0) is not None:
                self.target(m.bias_key, where)  # no bias slot at all: a foreign adapter
            layer.bias = torch.nn.Parameter(torch.zeros_like(bd, dtype=dtype), requires_grad=False)
            self.added_bias.append(layer)
            self.state[m.bias_key] = layer.bias
        bias = self.target(m.bias_key, where)
        self._keep(m.bias_key, bias)
        bias.add_(bd.to(bias.dtype))

    def replace_extra(self, adapters) -> None:
        """``modules_to_save`` tensors replace the base's; two adapters may not both replace one."""
        replaced: dict[str, object] = {}
        for adapter, _ in adapters:
            for key, tensor in adapter.extra.items():
                if key in replaced:
                    raise InvalidAdapter(adapter.path, f"{key} is replaced by two adapters "
                                         f"({replaced[key]} and {adapter.path})")
                param = self.target(key, adapter.path)
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ShapeMismatch(key, param.shape, tensor.shape, str(adapter.path or ""))
                replaced[key] = adapter.path
                self._keep(key, param)
                param.copy_(as_torch(tensor).to(param.dtype))

    def restore(self) -> None:
        import torch

        with torch.no_grad():
            for key, original in self.saved.items():
                self.state[key].copy_(original)
        for layer in self.added_bias:
            layer.bias = None


def _stacked(items):
    from ..lora import stacked_delta

    mods = [m for m, _ in items]
    if len({(m.delta_shape, m.transposed) for m in mods}) == 1:
        return stacked_delta(items)
    # mixed orientation cannot share one product; sum in float32 instead
    total = None
    for m, w in items:
        d = m.delta(w)
        total = d if total is None else total + d
    return total
