"""The compact LoRA trainer (imported as ``adapterhub_local.trainer``).

    from adapterhub_local.trainer import TrainConfig, train
    result = train(TrainConfig(base="./base", data="train.jsonl", name="support", max_steps=200))
    result.out, result.metrics["eval_loss"], result.record

    from adapterhub_local.trainer import apply_adapter, adapter_applied
    with adapter_applied(model, load_adapter("./support")):
        logits = model(ids).logits

Heavy imports (torch, transformers) happen on first use of an attribute, so
importing this package stays cheap for the CLI.
"""

from __future__ import annotations

_EXPORTS = {
    "TrainConfig": ".config", "TrainConfigError": ".config",
    "train": ".loop", "TrainResult": ".loop", "get_lr": ".loop", "evaluate": ".loop",
    "apply_adapter": ".lora_layers", "adapter_applied": ".lora_layers",
    "remove_adapter": ".lora_layers", "inject_lora": ".lora_layers",
    "extract_adapter": ".lora_layers", "LoraLayer": ".lora_layers",
    "set_lora_enabled": ".lora_layers",
    "DataError": ".data", "load_dataset": ".data",
    "CheckpointError": ".checkpoint", "load_checkpoint": ".checkpoint",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
