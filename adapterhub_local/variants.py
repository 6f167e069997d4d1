"""Which PEFT LoRA variants we merge, which we refuse, and which fields we may ignore: as data.

Every field of PEFT 0.21's ``LoraConfig`` (peft/tuners/lora/config.py, class LoraConfig) is
in ``FIELDS`` with one of three statuses:

* ``supported``: we implement its math (or it only names things), equal to PEFT;
* ``ignored``: it has no effect on the saved weights' meaning (training-time settings,
  init schemes that leave the base untouched);
* ``refused``: when set to anything but its neutral value it changes the math in a way we do
  not implement, so every command that loads the adapter stops with one line naming it.

Tensor names go through :func:`classify_key` the same way: the LoRA factors, the DoRA
magnitude vector, the saved copy of a target's base layer, known training-only buffers
(ignored with a note), whole replacement tensors (``modules_to_save``), and any other
``lora_*`` tensor, which is refused by name: it is never taken for a ``modules_to_save``
tensor. Both checks run inside ``peft_format.load_adapter`` / ``parse_state_dict``, the
one path every command (inspect, register, merge, stack, interpolate, push, pull) loads
adapters through, so no command can skip them.

docs/formats.md's table is generated from ``FIELDS`` (``markdown_table``); a test keeps it
current and checks that ``FIELDS`` names exactly the installed PEFT's LoraConfig fields.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SUPPORTED, IGNORED, REFUSED = "supported", "ignored", "refused"


def _set(v: Any) -> bool:
    """Anything but None / False / empty."""
    return v not in (None, False) and v != {} and v != [] and v != ""


# init_lora_weights values that change the BASE weights when the adapter is created
# (peft/tuners/lora/layer.py LoraLayer.update_layer -> pissa_init, olora_init, corda_init,
# loftq_init, orthogonal_init, lora_ga_init: each writes `weight.data = weight - s·B·A` or
# a quantised residual). Such an adapter is valid only against that modified base, unless
# PEFT converted it on save (save_pretrained(path_initial_model_for_weight_conversion=...)),
# which rewrites init_lora_weights to True (peft/peft_model.py, PeftModel.save_pretrained).
_BASE_ALTERING_INITS = ("pissa", "olora", "corda", "loftq", "orthogonal", "lora_ga")


def _alters_base(v: Any) -> bool:
    return isinstance(v, str) and v.lower().startswith(_BASE_ALTERING_INITS)


@dataclass(frozen=True)
class Field:
    status: str
    why: str
    refuse_if: Callable[[Any], bool] | None = None  # for REFUSED: when the value changes the math

    def refuses(self, value: Any) -> bool:
        return self.status == REFUSED and (self.refuse_if or _set)(value)


FIELDS: dict[str, Field] = {
    # identity and bookkeeping
    "task_type": Field(IGNORED, "names the model head; the weights mean the same"),
    "peft_type": Field(SUPPORTED, "must be LORA; any other PEFT method is refused when the config is read"),
    "auto_mapping": Field(IGNORED, "how PEFT finds the base class; no effect on the weights"),
    "peft_version": Field(IGNORED, "the PEFT version that wrote the file"),
    "base_model_name_or_path": Field(SUPPORTED, "shown by inspect; the base fingerprint is what we check"),
    "revision": Field(IGNORED, "the base model's Hub revision; the fingerprint is what we check"),
    "inference_mode": Field(IGNORED, "training flag"),
    # the core math
    "r": Field(SUPPORTED, "rank; checked against every factor's shape"),
    "target_modules": Field(SUPPORTED, "read from the tensor names; kept in written configs"),
    "exclude_modules": Field(SUPPORTED, "only decides which modules got factors; the tensors say which did"),
    "lora_alpha": Field(SUPPORTED, "scaling s = alpha / r"),
    "lora_dropout": Field(IGNORED, "training only; PEFT merges without dropout"),
    "fan_in_fan_out": Field(SUPPORTED, "delta transposed for weights stored (in, out) (GPT-2 Conv1D)"),
    "bias": Field(REFUSED, "'all' / 'lora_only' train the base layers' biases too (saved as whole bias "
                  "tensors); not supported yet", lambda v: v not in (None, "none")),
    "use_rslora": Field(SUPPORTED, "scaling s = alpha / sqrt(r)"),
    "modules_to_save": Field(SUPPORTED, "whole replacement tensors, written as they are"),
    "init_lora_weights": Field(
        REFUSED, "pissa / olora / corda / loftq / orthogonal / lora_ga initialisation changes the base weights: "
        "the adapter is only valid against that modified base (convert it on save with PEFT's "
        "path_initial_model_for_weight_conversion); other values (true, false, gaussian, eva, mica) "
        "only set the starting factors", _alters_base),
    "layers_to_transform": Field(SUPPORTED, "only decides which layers got factors; the tensors say which did"),
    "layers_pattern": Field(SUPPORTED, "only decides which layers got factors; the tensors say which did"),
    "rank_pattern": Field(SUPPORTED, "per-module r (PEFT's suffix-regex match)"),
    "alpha_pattern": Field(SUPPORTED, "per-module alpha (PEFT's suffix-regex match)"),
    "megatron_config": Field(REFUSED, "Megatron tensor-parallel layers: sharded factors we do not read"),
    "megatron_core": Field(IGNORED, "module name used only with megatron_config"),
    "trainable_token_indices": Field(
        REFUSED, "trains single embedding rows (trainable_tokens_delta tensors), an update that is not W + s·B·A"),
    "loftq_config": Field(IGNORED, "only used with init_lora_weights='loftq', which is refused"),
    "eva_config": Field(IGNORED, "EVA initialisation: sets the starting factors, base untouched"),
    "corda_config": Field(IGNORED, "only used with init_lora_weights='corda', which is refused"),
    "lora_ga_config": Field(IGNORED, "only used with init_lora_weights='lora_ga', which is refused"),
    "use_dora": Field(SUPPORTED, "DoRA: merged into a base as PEFT merges it (magnitude / row norm); "
                      "refused where its delta would have to be added (stack, interpolate, --into-adapter)"),
    "velora_config": Field(IGNORED, "VeLoRA compresses activations in training; PEFT merges it as plain LoRA "
                           "(variants.py VeloraLinearVariant.merge_safe); its lora_velora_embed buffer is skipped"),
    "alora_invocation_tokens": Field(
        REFUSED, "aLoRA applies the adapter only after the invocation tokens: no merged weight equals it"),
    "use_qalora": Field(REFUSED, "QA-LoRA pools the input in groups (qalora_group_size): a different delta"),
    "qalora_group_size": Field(IGNORED, "only used with use_qalora, which is refused"),
    "monteclora_config": Field(
        REFUSED, "MonteCLoRA samples perturbations of A in its forward: the adapter's output is not one "
        "fixed W + s·B·A"),
    "layer_replication": Field(
        REFUSED, "duplicates base layers before adapting them: the adapted model has layers the base lacks"),
    "runtime_config": Field(IGNORED, "runtime placement (ephemeral GPU offload); not saved math"),
    "lora_bias": Field(SUPPORTED, "lora_B.bias added to the base bias"),
    "target_parameters": Field(
        SUPPORTED, "LoRA on MoE expert parameters (PEFT's ParamWrapper): merged into a base stored per "
        "expert (experts.N.gate_proj/up_proj/down_proj, w1/w3/w2) or into a base that stores the fused 3-D "
        "tensor ((E, out, in), or (E, in, out) with is_transposed as GPT-OSS), and combined exactly by cat "
        "(stack, --into-adapter --method cat); the other methods are refused by name"),
    "use_bdlora": Field(REFUSED, "BD-LoRA uses block-diagonal factors (variants.py BdLoraLinearVariant)"),
    "arrow_config": Field(REFUSED, "Arrow routes each token among several LoRA experts: no single merged weight"),
    "kasa_config": Field(
        REFUSED, "KaSA truncates the base weight's singular values and scales B·A by lora_diag"),
    "ensure_weight_tying": Field(IGNORED, "ties adapters of tied embeddings in PEFT's model; the saved factors "
                                 "say the same"),
}

# Tensors ------------------------------------------------------------------------------

# PEFT keys after the adapter name was stripped; an unstripped ".default" is tolerated.
_FACTOR = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
    r"lora_magnitude_vector)(?:\.[A-Za-z0-9_\-]+)??(?:\.(?P<leaf>weight|bias))?$"
)
# training-time buffers that leave the merge plain LoRA: (segment, note)
IGNORED_TENSORS = {
    "lora_velora_embed": "VeLoRA's training buffer; PEFT merges VeLoRA as plain LoRA",
}
_LORA_SEGMENT = re.compile(r"(?:^|\.)((?:lora|trainable_tokens)_[A-Za-z0-9_]*)(?:\.|$)")


@dataclass(frozen=True)
class KeyKind:
    kind: str  # "factor" | "saved_base" | "ignored" | "refused" | "replacement"
    module: str = ""
    part: str = ""
    note: str = ""


def classify_key(short: str) -> KeyKind:
    """What a state-dict key (PEFT's ``base_model.model.`` prefix removed) holds."""
    m = _FACTOR.match(short)
    if m:  # under nested ".base_layer"s: another wrapper's factors (peft_format / experts.py decide)
        part = m.group("part") + (".bias" if m.group("leaf") == "bias" else "")
        return KeyKind("factor", m.group("module"), part)
    seg = _LORA_SEGMENT.search(short)
    if seg:
        name = seg.group(1)
        if name in IGNORED_TENSORS:
            return KeyKind("ignored", note=f"{short}: {IGNORED_TENSORS[name]}")
        return KeyKind("refused", note=f"tensor {short}: {name} is a LoRA variant's tensor we do not implement")
    if short.endswith(".base_layer.weight") and short.count(".base_layer.") == 1:
        # PEFT saves a targeted embedding's full matrix as "<module>.base_layer.weight"
        return KeyKind("saved_base", short.removesuffix(".base_layer.weight"))
    return KeyKind("replacement", short)


def refused_fields(cfg: dict) -> list[tuple[str, str]]:
    """(field, why) for every config field whose value we do not implement."""
    out = []
    for name, f in FIELDS.items():
        if name in cfg and f.refuses(cfg[name]):
            out.append((name, f.why))
    return out


def markdown_table() -> str:
    """docs/formats.md's field table."""
    rows = ["| field | status | why |", "|---|---|---|"]
    for name, f in FIELDS.items():
        rows.append(f"| `{name}` | {f.status} | {f.why} |")
    return "\n".join(rows) + "\n"


def refuse_dora_algebra(ref: str, adapter, method: str = "cat") -> None:
    """DoRA in stack / interpolate / --into-adapter: refused, saying why and what to do.

    A DoRA module's update is m/‖W+s·B·A‖ ⊙ (W+s·B·A) − W (peft/tuners/lora/variants.py,
    DoraLinearVariant.merge_safe): it depends on the base weight and is not a low-rank sum,
    so no combination of factors reproduces it."""
    from .errors import UnsupportedAdapter

    if adapter.experts and method != "cat":
        raise UnsupportedAdapter(
            ref, f"LoRA on MoE expert parameters (target_parameters, e.g. {adapter.experts[0].key}): "
            f"{method} is not exact for it; only cat (stack, merge --into-adapter --method cat) is",
            "use cat, or merge it into the base instead: adapters merge BASE_DIR REF [REF ...] --out DIR")
    dora = adapter.dora_modules
    if dora:
        raise UnsupportedAdapter(
            ref, f"DoRA adapter ({len(dora)} modules with a lora_magnitude_vector, e.g. {dora[0]}): its update "
            "m/‖W+ΔW‖·(W+ΔW) − W depends on the base weight and is not low-rank-additive, so it cannot be "
            "stacked, interpolated or combined into an adapter",
            "merge it into the base instead: adapters merge BASE_DIR REF [REF ...] --out DIR")
