"""The factor-level rewrites `adapters convert` composes, each exact unless it says otherwise.

Modules are held as ``Mod`` (PEFT layout: A (r, in), B (out, r), the scale PEFT applies).
``undo_init`` is PEFT's own conversion for inits that changed the base
(peft/peft_model.py save_pretrained with path_initial_model_for_weight_conversion,
peft/tuners/lora/model.py subtract_mutated_init): ΔW = s·(B·A − B₀·A₀), written as
A' = [A; A₀], B' = [B, −B₀] at rank 2r and the same scale. ``compress`` is the
merge code's factored SVD; ``fold`` moves per-module scales into B.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import AdapterHubError
from ..lora import factored_sq_norm, scaling
from ..merge.methods import factored_svd


@dataclass
class Mod:
    name: str  # module name without base_model.model.
    kind: str  # linear | embedding
    A: torch.Tensor
    B: torch.Tensor
    rank: int
    alpha: float
    scale: float
    fan_in_fan_out: bool = False

    def scaled_b(self) -> torch.Tensor:
        return self.B.to(torch.float32) * self.scale


def frob_sq_diff(a1, b1, a2, b2) -> tuple[float, float]:
    """(‖B₁A₁‖², ‖B₁A₁ − B₂A₂‖²) from factors (B already scaled), r×r work in float64: the
    difference is one stacked pair [A₁; A₂], [B₁, −B₂]."""
    diff_a, diff_b = torch.cat([a1, a2]), torch.cat([b1, -b2.to(b1.dtype)], dim=1)
    return factored_sq_norm(a1, b1), factored_sq_norm(diff_a, diff_b)


# --- inits that changed the base -------------------------------------------------------------

def _torch(x) -> torch.Tensor:
    """A float32 torch copy of a factor (the loader gives numpy arrays)."""
    if isinstance(x, torch.Tensor):
        return x.to(torch.float32)
    import numpy as np

    return torch.from_numpy(np.array(x, dtype=np.float32))


def _initial_from_adapter(folder: Path, mods: dict[str, Mod]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A₀, B₀ from the initial adapter PEFT saved at init (init_lora_weights must be true there,
    as PEFT requires: tuners/lora/model.py _convert_state_dict_for_initial_model)."""
    from ..peft_format import load_adapter

    init = load_adapter(folder)
    if isinstance(init.config.get("init_lora_weights"), str):
        raise AdapterHubError(f"{folder}: the initial adapter has init_lora_weights="
                              f"{init.config['init_lora_weights']!r}", "PEFT saves it with init_lora_weights=true")
    out = {}
    for name, m in mods.items():
        im = init.modules.get(name)
        if im is None or tuple(im.A.shape) != tuple(m.A.shape) or tuple(im.B.shape) != tuple(m.B.shape):
            raise AdapterHubError(f"{folder}: the initial adapter has no module {name} of the same shape",
                                  "give the adapter PEFT saved at init for this run")
        out[name] = (_torch(im.A), _torch(im.B))
    return out


def _initial_from_base(base_dir: Path, init: str, mods: dict[str, Mod]) -> dict[str, tuple]:
    """A₀, B₀ recomputed from the original base weights: PiSSA (full SVD) and OLoRA (QR), the
    way PEFT computes them (peft/tuners/lora/layer.py pissa_init, olora_init). Only the product
    B₀·A₀ matters, and it does not depend on the sign choices of the decomposition."""
    from ..fingerprint import model_files
    from ..safetensors_io import read_arrays, read_header

    kind = init.lower()
    if kind != "pissa" and kind != "olora":
        why = ("its randomised SVD cannot be recomputed" if kind.startswith("pissa_niter")
               else "it depends on more than the base weights")
        raise AdapterHubError(f"init_lora_weights={init!r}: {why}",
                              "give --base the initial adapter PEFT saved at init "
                              "(path_initial_model_for_weight_conversion)")
    where: dict[str, Path] = {}
    for f in model_files(base_dir):  # the one reader: every header validated before use
        for k in read_header(f)[0]:
            where[k] = f
    out = {}
    mapped: dict[Path, dict] = {}
    for name, m in mods.items():
        key = f"{name}.weight"
        if key not in where:
            raise AdapterHubError(f"{base_dir}: no weight {key}", "give the base the adapter was initialised on")
        if where[key] not in mapped:  # one copy-on-write mapping per shard, no copy until used
            mapped[where[key]] = read_arrays(where[key], float32=True)[0]
        w = torch.from_numpy(np.array(mapped[where[key]][key], dtype=np.float32))
        if kind == "pissa":
            w = w.T if m.fan_in_fan_out else w
            v, s, uh = torch.linalg.svd(w, full_matrices=False)
            sr = s[: m.rank] / m.scale
            a0 = torch.diag(torch.sqrt(sr)) @ uh[: m.rank]
            b0 = v[:, : m.rank] @ torch.diag(torch.sqrt(sr))
        else:
            if m.fan_in_fan_out:
                raise AdapterHubError(f"{name}: OLoRA on a Conv1D layer is not converted",
                                      "give --base the initial adapter PEFT saved at init")
            q, r = torch.linalg.qr(w)
            a0, b0 = r[: m.rank], q[:, : m.rank]
        if tuple(a0.shape) != tuple(m.A.shape) or tuple(b0.shape) != tuple(m.B.shape):
            raise AdapterHubError(f"{name}: the base weight {list(w.shape)} does not fit the adapter's factors",
                                  "give the base the adapter was initialised on")
        out[name] = (a0.contiguous(), b0.contiguous())
    return out


def undo_init(mods: dict[str, Mod], cfg: dict, base_dir: Path) -> dict:
    """PEFT's conversion to a plain LoRA on the original base; returns the new config."""
    init = str(cfg.get("init_lora_weights"))
    if cfg.get("use_rslora") and (cfg.get("rank_pattern") or cfg.get("alpha_pattern")):
        raise AdapterHubError("init_lora_weights conversion with use_rslora and rank/alpha patterns",
                              "PEFT refuses this combination too (tuners/lora/model.py)")
    if any(m.kind != "linear" for m in mods.values()):
        raise AdapterHubError(f"init_lora_weights={init!r} with embedding LoRA modules is not converted")
    base_dir = Path(base_dir)
    initial = (_initial_from_adapter(base_dir, mods) if (base_dir / "adapter_config.json").is_file()
               else _initial_from_base(base_dir, init, mods))
    for name, m in mods.items():
        a0, b0 = initial[name]
        m.A = torch.cat([m.A.to(torch.float32), a0.to(torch.float32)], dim=0)
        m.B = torch.cat([m.B.to(torch.float32), -b0.to(torch.float32)], dim=1)
        m.rank *= 2
        m.alpha *= math.sqrt(2) if cfg.get("use_rslora") else 2  # same scale at twice the rank
    cfg = dict(cfg)
    cfg["init_lora_weights"] = True
    cfg["r"] = int(cfg.get("r", 8)) * 2
    cfg["lora_alpha"] = cfg.get("lora_alpha", 8) * (math.sqrt(2) if cfg.get("use_rslora") else 2)
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            cfg[key] = {k: 2 * v for k, v in cfg[key].items()}
    return cfg


# --- renames, compression, folding ------------------------------------------------------------

def parse_rewrite(spec: str) -> tuple[str, str]:
    old, sep, new = spec.partition("=")
    if not sep or not old or old.endswith(".") or new.endswith(".") or "*" in spec:
        raise AdapterHubError(f"--rewrite-prefix {spec!r}: expected OLD=NEW, dotted module prefixes "
                              "(NEW may be empty)")
    return old, new


def rewrite_names(mods: dict[str, Mod], cfg: dict, old: str, new: str) -> tuple[dict[str, Mod], dict]:
    def ren(name: str) -> str:
        if name == old or name.startswith(old + "."):
            rest = name[len(old):].lstrip(".")
            return ".".join(x for x in (new, rest) if x)
        return name

    out = {}
    for name, m in mods.items():
        m.name = ren(name)
        if m.name in out:
            raise AdapterHubError(f"--rewrite-prefix maps two modules onto {m.name}")
        out[m.name] = m
    if all(ren(n) == n for n in mods):
        raise AdapterHubError(f"--rewrite-prefix: no module name starts with {old!r}")
    cfg = dict(cfg)
    esc_old, esc_new = re.escape(old), re.escape(new)
    for key in ("rank_pattern", "alpha_pattern"):
        patt = cfg.get(key) or {}
        cfg[key] = {(esc_new + k[len(esc_old):] if k.startswith(esc_old) else ren(k)): v for k, v in patt.items()}
    tm = cfg.get("target_modules")
    if isinstance(tm, list):
        cfg["target_modules"] = sorted({ren(t) for t in tm})
    return out, cfg


def compress(mods: dict[str, Mod], max_rank: int, use_rslora: bool) -> list[dict]:
    """Modules above ``max_rank`` become a truncated SVD of their ΔW (scale folded in, so the
    module's scale is 1 at the new rank). Returns one report row per compressed module."""
    if max_rank <= 0:
        raise AdapterHubError(f"--max-rank must be positive, got {max_rank}")
    rows = []
    for m in mods.values():
        if m.rank <= max_rank:
            continue
        a, b, kept, total = factored_svd(m.A.to(torch.float32).numpy(), m.scaled_b().numpy(), max_rank)
        a, b = torch.from_numpy(a), torch.from_numpy(b)
        k = int(a.shape[0])
        rows.append({"module": m.name, "from_rank": m.rank, "rank": k,
                     "rel_error": math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0,
                     "energy_kept": kept / total if total > 0 else 1.0,
                     "exact_sq": total, "err_sq": max(total - kept, 0.0)})
        m.A, m.B, m.rank = a, b, k
        m.alpha = math.sqrt(k) if use_rslora else float(k)
        m.scale = 1.0
    return rows


def fold(mods: dict[str, Mod]) -> int:
    """One global scale of 1 (r = lora_alpha = R, no rsLoRA) for servers that read only r and
    lora_alpha: each module's own scale moves into B, and every module is zero-padded to the
    adapter's largest rank R (padding adds nothing to B·A). Returns R."""
    big = max(m.rank for m in mods.values())
    for m in mods.values():
        a, b = m.A.to(torch.float32), m.scaled_b()
        pad = big - m.rank
        if pad:
            a = torch.cat([a, a.new_zeros(pad, a.shape[1])], dim=0)
            b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
        m.A, m.B, m.rank, m.alpha, m.scale = a, b, big, float(big), 1.0
    return big


def explicit_config(cfg: dict, mods: dict[str, Mod], use_rslora: bool) -> dict:
    """A config whose r / lora_alpha / patterns give every module its (rank, alpha): the most
    common pair globally, the rest as escaped full-name patterns (both PEFT and vLLM match a
    pattern as ``(.*\\.)?(key)$``, first key first)."""
    pairs = Counter((m.rank, m.alpha) for m in mods.values())
    (r0, a0), _ = pairs.most_common(1)[0]
    cfg = dict(cfg)
    cfg["r"], cfg["lora_alpha"], cfg["use_rslora"] = int(r0), _num(a0), bool(use_rslora)
    cfg["rank_pattern"] = {re.escape(n): int(m.rank) for n, m in sorted(mods.items()) if m.rank != r0}
    cfg["alpha_pattern"] = {re.escape(n): _num(m.alpha) for n, m in sorted(mods.items()) if m.alpha != a0}
    return cfg


def _num(x: float):
    return int(x) if float(x).is_integer() else float(x)


def check_scales(mods: dict[str, Mod], cfg: dict) -> None:
    """Every module's scale, as PEFT reads the written config, is the one it was written with."""
    from ..lora import module_rank_alpha

    for name, m in mods.items():
        r, alpha = module_rank_alpha(cfg, name)
        s = scaling(r, alpha, bool(cfg.get("use_rslora")))
        if r != m.rank or not math.isclose(s, m.scale, rel_tol=1e-12):
            raise AssertionError(f"{name}: config gives r={r} s={s}, module has r={m.rank} s={m.scale}")
