"""Tiny models and adapters written with numpy and our own safetensors writer: no torch in
the process that builds them. Used by test_startup.py and benchmarks/cli.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from adapterhub_local.peft_format import lora_config
from adapterhub_local.safetensors_io import save_safetensors

PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_base(out: Path, hidden: int = 32, layers: int = 2, vocab: int = 64, seed: int = 0) -> Path:
    """A llama-shaped base folder: config.json and one model.safetensors (attention + embeddings)."""
    out = Path(out)
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    w = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden), dtype=np.float32)}
    for i in range(layers):
        for p in PROJS:
            w[f"model.layers.{i}.self_attn.{p}.weight"] = rng.standard_normal((hidden, hidden), dtype=np.float32)
    save_safetensors(w, out / "model.safetensors", metadata={"format": "pt"}, fsync=False)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "num_hidden_layers": layers, "num_attention_heads": 4, "vocab_size": vocab}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def make_adapter(out: Path, base: Path, hidden: int = 32, layers: int = 2, r: int = 4, seed: int = 1,
                 size_mb: float | None = None) -> Path:
    """A PEFT LoRA folder on ``base``'s q/k/v/o projections. With ``size_mb`` the layer count
    grows until the weights file is about that many megabytes."""
    if size_mb is not None:  # 4 projections x (A + B) x r x hidden float32 per layer
        layers = max(layers, round(size_mb * 2**20 / (len(PROJS) * 2 * r * hidden * 4)))
    out = Path(out)
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    t = {}
    for i in range(layers):
        for p in PROJS:
            pre = f"base_model.model.model.layers.{i}.self_attn.{p}"
            t[f"{pre}.lora_A.weight"] = rng.standard_normal((r, hidden), dtype=np.float32) * 0.1
            t[f"{pre}.lora_B.weight"] = rng.standard_normal((hidden, r), dtype=np.float32) * 0.1
    save_safetensors(t, out / "adapter_model.safetensors", metadata={"format": "pt"}, fsync=False)
    cfg = lora_config(r=r, lora_alpha=2 * r, target_modules=list(PROJS), base_model_name_or_path=str(base),
                      task_type="CAUSAL_LM")
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out
