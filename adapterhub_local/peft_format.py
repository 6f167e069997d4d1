"""Read and write PEFT LoRA folders (adapter_config.json + adapter_model.safetensors).

What PEFT writes we read; what we write PEFT loads. Pickled ``adapter_model.bin``
is refused, never unpickled. Every problem is an ``InvalidAdapter`` naming the
file and what is wrong with it.

``load_adapter`` reads the safetensors file with the one validating reader
(safetensors_io) into numpy arrays, floating tensors as float32 (views of the
mapped file when stored as float32): no torch. Code that does torch math turns
an array into a tensor with ``lora.as_torch`` (``torch.from_numpy``, no copy).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InvalidAdapter, UnsupportedAdapter
from .experts import ExpertFactors, candidates, is_expert_module
from .fsutil import check_folder
from .lora import LoraModule, module_rank_alpha, scaling
from .safetensors_io import TensorView
from .variants import classify_key, refused_fields

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

PEFT_DEFAULTS: dict = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": True,
    "r": 8,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "target_modules": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "bias": "none",
    "use_rslora": False,
    "modules_to_save": None,
    "init_lora_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "use_dora": False,
    "lora_bias": False,
}


def lora_config(**fields) -> dict:
    """A full PEFT LoraConfig dict: PEFT's defaults, overridden by ``fields``."""
    unknown = set(fields) - set(PEFT_DEFAULTS) - {"megatron_config", "megatron_core"}
    if unknown:
        raise ValueError(f"unknown LoRA config field(s): {', '.join(sorted(unknown))}")
    cfg = dict(PEFT_DEFAULTS)
    cfg.update(fields)
    if isinstance(cfg["target_modules"], (set, tuple)):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    return cfg


@dataclass
class LoraAdapter:
    """A LoRA adapter in memory: its config, one LoraModule per adapted module,
    and whole replacement tensors (``modules_to_save``) keyed by base weight name."""

    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path | None = None
    dtypes: dict[str, str] = field(default_factory=dict)  # PEFT key -> dtype in the file read
    notes: list[str] = field(default_factory=list)  # tensors skipped on purpose (variants.IGNORED_TENSORS)
    experts: list[ExpertFactors] = field(default_factory=list)  # target_parameters (experts.py)

    @property
    def dora_modules(self) -> list[str]:
        return [n for n, m in self.modules.items() if m.magnitude is not None]

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})

    def num_parameters(self) -> int:
        return sum(m.num_parameters() for m in self.modules.values()) + sum(
            math.prod(t.shape) for t in self.extra.values()
        ) + sum(math.prod(g.A.shape) + math.prod(g.B.shape) for g in self.experts)

    def targets(self) -> list[str]:
        """Short target names (q_proj, v_proj, ...), sorted."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules})

    def to_torch(self) -> LoraAdapter:
        """The same adapter with torch tensors that share the arrays' memory (no copy)."""
        from dataclasses import replace

        from .lora import as_torch

        modules = {n: replace(m, A=as_torch(m.A), B=as_torch(m.B),
                              bias=None if m.bias is None else as_torch(m.bias)) for n, m in self.modules.items()}
        return replace(self, modules=modules, extra={k: as_torch(t) for k, t in self.extra.items()})

    def tensors(self) -> dict[str, torch.Tensor]:
        """The PEFT state dict, keys as PEFT saves them."""
        out: dict[str, torch.Tensor] = {}
        for name, m in self.modules.items():
            if m.kind == "embedding":
                out[f"{PREFIX}{name}.lora_embedding_A"] = m.A
                out[f"{PREFIX}{name}.lora_embedding_B"] = m.B
            else:
                out[f"{PREFIX}{name}.lora_A.weight"] = m.A
                out[f"{PREFIX}{name}.lora_B.weight"] = m.B
                if m.bias is not None:
                    out[f"{PREFIX}{name}.lora_B.bias"] = m.bias
            if m.magnitude is not None:
                out[f"{PREFIX}{name}.lora_magnitude_vector"] = m.magnitude
        for g in self.experts:
            out[f"{PREFIX}{g.key}.lora_A.weight"] = g.A
            out[f"{PREFIX}{g.key}.lora_B.weight"] = g.B
        for key, t in self.extra.items():
            out[f"{PREFIX}{key}"] = t
        return out


def _read_config(folder: Path) -> dict:
    from .adapter_config import read_config

    cfg = read_config(folder)  # size, syntax, depth, types and ranges checked
    cfg_path = folder / CONFIG_NAME
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise InvalidAdapter(
            cfg_path, f"unknown peft_type {cfg.get('peft_type')!r}", "only LORA adapters are supported"
        )
    check_variant(cfg, cfg_path)
    return cfg


def check_variant(cfg: dict, where) -> None:
    """Refuse, by field name, a LoRA variant whose math we do not implement (variants.FIELDS)."""
    refused = refused_fields(cfg)
    if refused:
        name, why = refused[0]
        raise UnsupportedAdapter(where, f"{name}={json.dumps(cfg[name], default=str)[:60]} is not supported: {why}",
                                 "merge it with PEFT itself (merge_and_unload)")


def _is_float(t) -> bool:
    if isinstance(t, TensorView):
        return t.floating
    return t.is_floating_point() if hasattr(t, "is_floating_point") else t.dtype.kind == "f"


def _all_finite(t) -> bool:
    if isinstance(t, TensorView):  # the header-only path: a scan of the bits, no numpy
        return t.all_finite()
    if hasattr(t, "is_floating_point"):
        import torch

        return bool(torch.isfinite(t).all())
    import numpy as np

    return bool(np.isfinite(t).all())


def _weights_of(folder: Path) -> tuple[dict, Path]:
    """The checked config and the weights file of a PEFT folder (the checks both loaders share)."""
    if not folder.exists():
        raise InvalidAdapter(folder, "no such file or directory")
    if not folder.is_dir():
        raise InvalidAdapter(folder, "not a directory", "give the folder holding adapter_config.json")
    check_folder(folder, "adapter folder")  # no symlink or special file: nothing is followed out of it
    cfg = _read_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / PICKLE_NAME).is_file():
            raise UnsupportedAdapter(
                folder / PICKLE_NAME,
                "pickled weights are not loaded (unpickling can run arbitrary code)",
                "in a trusted environment run PeftModel.from_pretrained(...).save_pretrained(dir, "
                "safe_serialization=True) to write adapter_model.safetensors",
            )
        raise InvalidAdapter(folder, f"no {WEIGHTS_NAME}")
    return cfg, weights


def load_adapter(folder: str | Path, allow_dora: bool = True, check_finite: bool = True) -> LoraAdapter:
    """Load and validate a PEFT LoRA folder: factors as float32 numpy arrays, no torch."""
    from .safetensors_io import read_arrays

    folder = Path(folder)
    cfg, weights = _weights_of(folder)
    tensors, _, infos = read_arrays(weights, InvalidAdapter, float32=True)
    adapter = parse_state_dict(tensors, cfg, folder, allow_dora=allow_dora, check_finite=check_finite)
    adapter.dtypes = {k: info.dtype for k, info in infos.items()}
    return adapter


def check_adapter(folder: str | Path) -> LoraAdapter:
    """Every check ``load_adapter`` makes, config, header, shapes and finiteness alike, without
    numpy or torch: the factors are ``TensorView``s (shape, dtype, bytes), enough for what
    register, push and pull record (ranks, targets, parameter counts, shapes against a base).
    Use ``load_adapter`` for math."""
    from .safetensors_io import read_views, refuse_unreadable

    folder = Path(folder)
    cfg, weights = _weights_of(folder)
    views, _, infos = read_views(weights, InvalidAdapter)
    refuse_unreadable(infos, weights, InvalidAdapter)
    adapter = parse_state_dict(views, cfg, folder)
    adapter.dtypes = {k: info.dtype for k, info in infos.items()}
    return adapter


def parse_state_dict(tensors: dict, cfg: dict, where: Path | str = "<memory>",
                     allow_dora: bool = True, check_finite: bool = True) -> LoraAdapter:
    """Classify every tensor (variants.classify_key) and build the modules. ``allow_dora``
    is kept for old callers: DoRA adapters are always read; commands whose math cannot take
    them (stack, interpolate, --into-adapter) refuse them by name."""
    where = Path(where)
    wfile = where / WEIGHTS_NAME if where.is_dir() else where
    check_variant(cfg, where / CONFIG_NAME if where.is_dir() else where)
    parts: dict[str, dict] = {}
    extra: dict = {}
    notes: list[str] = []
    for key, t in tensors.items():
        short = key.removeprefix(PREFIX)
        kind = classify_key(short)
        if kind.kind == "refused":
            raise UnsupportedAdapter(wfile, kind.note, "merge it with PEFT itself (merge_and_unload)")
        if kind.kind == "ignored":
            notes.append(kind.note)
            continue
        if check_finite and _is_float(t) and not _all_finite(t):
            raise InvalidAdapter(wfile, f"tensor {key} has non-finite values (NaN or inf)")
        if kind.kind == "factor":
            parts.setdefault(kind.module, {})[kind.part] = t
        elif kind.kind == "saved_base":  # a targeted embedding's own base layer, as PEFT saves it
            extra[f"{kind.module}.weight"] = t
        else:
            extra[short] = t
    if not parts and not extra:
        raise InvalidAdapter(wfile, "contains no tensors")

    use_rslora = bool(cfg.get("use_rslora", False))
    fifo = bool(cfg.get("fan_in_fan_out", False))
    modules: dict[str, LoraModule] = {}
    experts: list[ExpertFactors] = []
    for name, p in sorted(parts.items()):
        if is_expert_module(name, cfg):  # experts.py: which parameter is decided against the base
            if set(p) != {"lora_A", "lora_B"}:
                extra_parts = ", ".join(sorted(set(p) - {"lora_A", "lora_B"})) or "a missing factor"
                raise UnsupportedAdapter(wfile, f"{name}: expert LoRA with {extra_parts} "
                                         "is not supported (only lora_A and lora_B)")
            a, b = p["lora_A"], p["lora_B"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise InvalidAdapter(wfile, f"{name}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not chain")
            experts.append(ExpertFactors(name.replace(".base_layer", ""), name.count(".base_layer"), a, b))
            continue
        if ".base_layer." in name + ".":
            raise UnsupportedAdapter(wfile, f"tensors {name}.lora_*: factors of a nested adapter layer (two LoRA "
                                     "wrappers on one module) without target_parameters naming it")
        mag = p.get("lora_magnitude_vector")
        if mag is not None and not cfg.get("use_dora"):
            raise InvalidAdapter(wfile, f"{name} has a DoRA lora_magnitude_vector but use_dora is not set "
                                 "in adapter_config.json")
        if mag is None and cfg.get("use_dora"):
            raise InvalidAdapter(wfile, f"{name} has no lora_magnitude_vector but use_dora=true "
                                 "(a DoRA adapter without its magnitudes)")
        if "lora_embedding_A" in p or "lora_embedding_B" in p:
            kind, ka, kb = "embedding", "lora_embedding_A", "lora_embedding_B"
        else:
            kind, ka, kb = "linear", "lora_A", "lora_B"
        if ka not in p or kb not in p:
            have, miss = (ka, kb) if ka in p else (kb, ka)
            raise InvalidAdapter(wfile, f"{name} has {have} but no {miss}")
        a, b = p[ka], p[kb]
        if a.ndim != 2 or b.ndim != 2:
            raise UnsupportedAdapter(
                wfile, f"{name}: only 2-D LoRA factors are supported (got {list(a.shape)} and "
                f"{list(b.shape)}; Conv LoRA is not supported)"
            )
        r, alpha = module_rank_alpha(cfg, name)
        if a.shape[0] != r or b.shape[1] != r:
            raise InvalidAdapter(
                wfile, f"{name}: {ka} {list(a.shape)} and {kb} {list(b.shape)} disagree with r={r} "
                "from adapter_config.json (r / rank_pattern)"
            )
        bias = p.get("lora_B.bias")
        if bias is not None and (bias.ndim != 1 or bias.shape[0] != b.shape[0]):
            raise InvalidAdapter(wfile, f"{name}: lora_B.bias has shape {list(bias.shape)}, expected [{b.shape[0]}]")
        if mag is not None:
            # one magnitude per output feature: B's rows (Linear), the embedding dim (B's rows too)
            if mag.ndim != 1 or mag.shape[0] != b.shape[0]:
                raise InvalidAdapter(wfile, f"{name}: lora_magnitude_vector has shape {list(mag.shape)}, "
                                     f"expected [{b.shape[0]}]")
        modules[name] = LoraModule(
            name=name, A=a, B=b, scale=scaling(r, alpha, use_rslora), kind=kind,
            fan_in_fan_out=fifo and kind == "linear", bias=bias, r=r, alpha=alpha, magnitude=mag,
        )
    if not modules and not experts and not extra:
        raise InvalidAdapter(wfile, "contains no LoRA modules")
    return LoraAdapter(config=cfg, modules=modules, extra=extra, path=where if where.is_dir() else None,
                       notes=notes, experts=experts)


def save_adapter(adapter: LoraAdapter, out: str | Path, overwrite: bool = False,
                 extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Write a PEFT folder atomically (temp dir, then one rename)."""
    from .fsutil import atomic_dir, atomic_write_bytes
    from .safetensors_io import save_safetensors

    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_safetensors(adapter.tensors(), tmp / WEIGHTS_NAME, metadata={"format": "pt"}, fsync=False)
        cfg = dict(adapter.config)
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for name, content in (extra_files or {}).items():
            data = content.encode("utf-8") if isinstance(content, str) else content
            atomic_write_bytes(tmp / name, data, fsync=False)
    return out


def _dtype_name(adapter: LoraAdapter, m: LoraModule) -> str:
    """The factors' dtype as stored (a bf16 file's arrays are float32 in memory)."""
    from .safetensors_io import DTYPES

    key = f"{PREFIX}{m.name}.{'lora_embedding_A' if m.kind == 'embedding' else 'lora_A.weight'}"
    stored = adapter.dtypes.get(key)
    return DTYPES[stored].torch if stored in DTYPES else str(m.A.dtype).replace("torch.", "")


def adapter_summary(adapter: LoraAdapter, norms: bool = True) -> dict:
    """What `adapters inspect` shows, as plain data. ``norms=False`` (an adapter from
    ``check_adapter``, whose factors are header views): no ‖ΔW‖ (``delta_norm`` is None) and no
    DoRA magnitude statistics, the only fields that need the values."""
    cfg = adapter.config
    modules = []
    for name, m in adapter.modules.items():
        row = {
            "module": name, "kind": m.kind, "r": m.rank, "alpha": m.alpha, "scaling": m.scale,
            "delta_shape": list(m.delta_shape), "delta_norm": m.delta_norm() if norms else None,
            "dtype": _dtype_name(adapter, m), "bias": m.bias is not None,
        }
        if m.magnitude is not None and norms:
            # ‖ΔW‖ above is s·‖B·A‖; the merged DoRA update also rescales W row by row by m/‖W+ΔW‖
            mag = [float(x) for x in m.magnitude.reshape(-1).tolist()]
            row["dora"] = {"magnitude_min": min(mag), "magnitude_max": max(mag),
                           "magnitude_mean": math.fsum(mag) / len(mag), "size": len(mag)}
        modules.append(row)
    return {
        "path": str(adapter.path) if adapter.path else None,
        "base_model": adapter.base_model,
        "peft_type": cfg.get("peft_type"),
        "task_type": cfg.get("task_type"),
        "r": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha"),
        "use_rslora": bool(cfg.get("use_rslora")),
        "ranks": adapter.ranks,
        "alphas": sorted({m.alpha for m in adapter.modules.values()}),
        "scalings": sorted({round(m.scale, 8) for m in adapter.modules.values()}),
        "rank_pattern": cfg.get("rank_pattern") or {},
        "alpha_pattern": cfg.get("alpha_pattern") or {},
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
        "target_modules": cfg.get("target_modules"),
        "targets": adapter.targets(),
        "num_modules": len(adapter.modules),
        "trainable_parameters": adapter.num_parameters(),
        "modules_to_save": sorted(adapter.extra),
        "use_dora": bool(cfg.get("use_dora")),
        "dora_modules": len(adapter.dora_modules),
        "notes": list(adapter.notes),
        "target_parameters": cfg.get("target_parameters") or [],
        # which parameter each wrapper holds is decided against the base (experts.py); here: the candidates
        "expert_lora": [{"module": g.module, "key": g.key, "depth": g.depth, "lora_A": list(g.A.shape),
                         "lora_B": list(g.B.shape), "parameters": candidates(g.module, cfg)}
                        for g in adapter.experts],
        "modules": modules,
    }
