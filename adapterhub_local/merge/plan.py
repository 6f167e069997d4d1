"""Plan a merge into a base before any data moves: which output tensor gets which deltas,
bias deltas and whole-tensor replacements; names, shapes and dtypes are checked up front,
and the tied input/output embedding pair is found without importing transformers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AdapterHubError, InvalidAdapter, ShapeMismatch
from ..experts import expert_modules
from ..lora import LoraModule
from .inputs import MergeInput
from .io import FLOAT_ST
from .report import MergeReport

EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                  "tok_embeddings.weight", "embeddings.weight")
LM_HEAD = "lm_head.weight"


@dataclass
class Edit:
    """Everything that happens to one output tensor."""

    deltas: list[tuple[LoraModule, float]] = field(default_factory=list)
    bias: list[tuple[LoraModule, float]] = field(default_factory=list)
    replace: tuple[object, str] | None = None  # modules_to_save: (array, input label)
    saved_base: list[tuple[object, str]] = field(default_factory=list)  # a target's saved base layer

    def touches(self) -> bool:
        return bool(self.deltas or self.bias or self.replace is not None or self.saved_base)


def load_config(base_dir: Path) -> dict:
    path = base_dir / "config.json"
    if not path.is_file():
        return {}
    from ..errors import InvalidModel

    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise InvalidModel(path, "not valid JSON") from None
    if not isinstance(config, dict):
        raise InvalidModel(path, "expected a JSON object")
    return config


def embedding_key(infos, config: dict) -> str | None:
    vocab = config.get("vocab_size")
    named = [k for k in infos if k.endswith(EMBED_SUFFIXES) and len(infos[k].shape) == 2
             and (vocab is None or infos[k].shape[0] == vocab)]
    if len(named) == 1:
        return named[0]
    hidden = config.get("hidden_size") or config.get("n_embd") or config.get("d_model")
    if vocab and hidden:
        cands = [k for k, i in infos.items() if list(i.shape) == [vocab, hidden]]
        if len(cands) == 1:
            return cands[0]
    return None


def plan_edits(inputs: list[MergeInput], infos, tied_embed: str | None, report: MergeReport):
    """Map output tensor name -> Edit; check names and shapes before any work starts."""
    edits: dict[str, Edit] = {}
    available = set(infos) | ({LM_HEAD} if tied_embed else set())

    def shape_of(key):
        return list(infos[tied_embed if key == LM_HEAD and key not in infos else key].shape)

    def dtype_of(key):
        return infos[tied_embed if key == LM_HEAD and key not in infos else key].dtype

    for inp in inputs:
        where = str(inp.folder)
        # MoE expert LoRA (target_parameters) becomes per-expert modules on this base (experts.py)
        mods = [*inp.adapter.modules.values(),
                *expert_modules(where, inp.adapter.config, inp.adapter.experts, infos)]
        module_keys = {m.weight_key for m in mods}
        for m in mods:
            key = m.weight_key
            if key not in available:
                raise InvalidAdapter(where, f"module {m.name} targets {key}, which the base model does not have",
                                     "this adapter was trained for a different architecture")
            if m.expert is not None:  # one expert's slice of a fused (E, d1, d2) tensor
                if len(shape_of(key)) != 3 or not 0 <= m.expert < shape_of(key)[0] \
                        or list(m.delta_shape) != shape_of(key)[1:]:
                    raise ShapeMismatch(f"{m.name} (expert {m.expert})", shape_of(key), m.delta_shape,
                                        where=inp.ref)
            elif list(m.delta_shape) != shape_of(key):
                raise ShapeMismatch(m.name, shape_of(key), m.delta_shape, where=inp.ref)
            if dtype_of(key) not in FLOAT_ST:
                raise InvalidAdapter(where, f"{key} has dtype {dtype_of(key)}; only floating-point weights "
                                     "can take a LoRA delta")
            if m.magnitude is not None and inp.weight not in (0, 1):  # merge/dora.py
                raise AdapterHubError(f"{inp.ref}: {m.name}: DoRA adapter with weight {inp.weight:g}; a DoRA "
                                      "merge has no weight", "give DoRA adapters weight 1 (PEFT merges them whole)")
            if inp.weight != 0:
                edits.setdefault(key, Edit()).deltas.append((m, inp.weight))
            if m.bias is not None:
                bkey = m.bias_key
                if bkey not in infos:
                    raise InvalidAdapter(where, f"{m.name} has lora_B.bias but the base layer has no bias "
                                         f"({bkey} is missing)", "lora_bias needs a base layer with a bias")
                if list(infos[bkey].shape) != [m.B.shape[0]]:
                    raise ShapeMismatch(bkey, infos[bkey].shape, [m.B.shape[0]], where=inp.ref)
                if inp.weight != 0:
                    edits.setdefault(bkey, Edit()).bias.append((m, inp.weight))
        for key, tensor in inp.adapter.extra.items():
            if key not in available:
                raise InvalidAdapter(where, f"modules_to_save tensor {key} is not in the base model")
            if list(tensor.shape) != shape_of(key):
                raise ShapeMismatch(key, shape_of(key), tensor.shape, where=f"{inp.ref} (modules_to_save)")
            if inp.weight == 0:
                continue
            e = edits.setdefault(key, Edit())
            if key in module_keys:
                # PEFT saves a targeted embedding's own base layer: a replacement only if it differs
                e.saved_base.append((tensor, inp.ref))
                continue
            if e.replace is not None:
                raise AdapterHubError(
                    f"{key} is replaced (modules_to_save) by both {e.replace[1]} and {inp.ref}",
                    "two whole-tensor replacements cannot be combined; merge one of them alone",
                )
            if inp.weight != 1:
                report.warn(f"{inp.ref}: {key} is a whole-tensor replacement (modules_to_save); "
                            f"it replaces the base tensor as is, weight {inp.weight:g} does not scale it")
            e.replace = (tensor, inp.ref)
    return edits
