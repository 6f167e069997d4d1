"""Extract: the difference of two full models as a LoRA adapter (truncated SVD per module).

Streams both models one tensor pair at a time. Every 2-D weight that differs
becomes a LoRA module: ΔW = tuned − base in float32, SVD, keep the top ``rank``
singular directions (or, with ``energy``, the fewest that keep that share of
‖ΔW‖², at most ``rank``; per-module ranks go to rank_pattern). Embeddings become
embedding LoRA; GPT-2's Conv1D weights (stored in×out) get fan_in_fan_out.
Differences a LoRA cannot express (norms, biases, changed shapes) are reported,
not silently dropped.
"""

from __future__ import annotations

import ctypes
import functools
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .. import provenance
from ..errors import AdapterHubError, BaseMismatch
from ..fsutil import check_output
from ..lora import LoraModule, orient_delta
from ..peft_format import LoraAdapter, lora_config, save_adapter
from ..safetensors_io import ITEMSIZE, numel
from .cast import to_f32
from .io import FLOAT_ST, Reader, scan_model
from .methods import truncated_svd
from .plan import load_config
from .report import MergeReport, rel_error, stderr_notify

EMBED_NAMES = ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "tok_embeddings",
               "position_embeddings", "embed_positions", "token_type_embeddings")
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "decision_transformer"}
CHUNK_ELEMS = 1 << 22  # elements per chunk when reading, comparing and summing (16 MiB of float32)


def _difference(rb: Reader, rt: Reader, bi, ti) -> np.ndarray | None:
    """tuned − base in float32 (the stored shape), chunk by chunk from the two mappings, each
    chunk dropped from memory once used; None when the bytes are identical (nothing is
    converted then). Memory: this one float32 tensor, allocated at the first difference."""
    ib, it = ITEMSIZE[bi.dtype], ITEMSIZE[ti.dtype]
    n = numel(bi.shape)
    out = None
    rb.begin(bi)
    rt.begin(ti)
    try:
        for e0 in range(0, n, CHUNK_ELEMS):
            e1 = min(n, e0 + CHUNK_ELEMS)
            vb = rb.view(bi, e0 * ib, (e1 - e0) * ib)
            vt = rt.view(ti, e0 * it, (e1 - e0) * it)
            if bi.dtype != ti.dtype or not np.array_equal(np.frombuffer(vb, np.uint8), np.frombuffer(vt, np.uint8)):
                if out is None:
                    out = np.zeros(n, dtype=np.float32)  # the chunks before this one are equal: 0
                np.subtract(to_f32(vt, ti.dtype), to_f32(vb, bi.dtype), out=out[e0:e1])
            del vb, vt
            rb.release(bi, e0 * ib, (e1 - e0) * ib)
            rt.release(ti, e0 * it, (e1 - e0) * it)
    finally:
        rb.end(bi)
        rt.end(ti)
    return None if out is None else out.reshape([int(x) for x in bi.shape])


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another libc)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _give_back_freed_memory() -> None:
    """Hand the heap's freed blocks back to the system after each tensor. glibc raises its
    mmap threshold after every large free, so later 16 MiB chunks and SVD workspaces come from
    the heap, whose freed pages it keeps: without this the peak grows with fragmentation over
    the run instead of staying at one tensor's work (about 0.1 GB on a 1.1B base)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _sum_sq(x: np.ndarray) -> float:
    """Σ x² in float64, a chunk at a time (no float64 copy of the whole tensor)."""
    flat = x.reshape(-1)
    total = 0.0
    for i in range(0, flat.size, CHUNK_ELEMS):
        c = flat[i : i + CHUNK_ELEMS].astype(np.float64)
        total += float(c @ c)
    return total


def _err_sq(d: np.ndarray, left: torch.Tensor, right: torch.Tensor) -> float:
    """‖d − left @ right‖² in float64, a block of rows at a time (d in its stored orientation)."""
    rows = max(1, CHUNK_ELEMS // max(1, d.shape[1]))
    total = 0.0
    for r0 in range(0, d.shape[0], rows):
        approx = (left[r0 : r0 + rows] @ right).numpy()
        total += _sum_sq(d[r0 : r0 + rows] - approx)
    return total


def extract_lora(base_dir, tuned_dir, out, rank: int | None = None, energy: float | None = None,
                 seed: int = 0, overwrite: bool = False, progress: bool = True, expect: dict | None = None,
                 notify=stderr_notify) -> MergeReport:
    from ..card import merge_adapter_card
    from ..fingerprint import fingerprint_model
    from ..progress import bar
    from .recipe import dump_recipe, extract_recipe

    if rank is None or int(rank) <= 0:
        raise AdapterHubError("extract needs --rank R (a positive integer; with --energy, the largest rank)")
    rank = int(rank)
    if energy is not None and not 0 < energy <= 1:
        raise AdapterHubError(f"--energy must be in (0, 1], got {energy}")
    base_dir, tuned_dir, out = Path(base_dir), Path(tuned_dir), Path(out)
    check_output(out, [base_dir, tuned_dir])  # never an input, inside or above one
    if out.exists() and not overwrite:
        raise AdapterHubError(f"{out}: already exists", "choose another --out, or --overwrite to replace it")
    report = MergeReport(operation="extract", method="svd", output=str(out))
    _, binfo = scan_model(base_dir)
    _, tinfo = scan_model(tuned_dir)
    config = load_config(base_dir)  # the merge's one config.json reader
    fifo_model = isinstance(config.get("model_type"), str) and config["model_type"] in CONV1D_MODEL_TYPES

    base_fp = fingerprint_model(base_dir, file_hashes=False).fingerprint
    tuned_fp = fingerprint_model(tuned_dir, file_hashes=False).fingerprint
    for what, want, have in (("base", (expect or {}).get("base"), base_fp),
                             ("tuned", (expect or {}).get("tuned"), tuned_fp)):
        if want and want != have:
            raise BaseMismatch(want, have, what=f"recipe {what} model")
    if base_fp == tuned_fp:
        raise AdapterHubError(f"{tuned_dir} and {base_dir} have identical weights: nothing to extract")

    rb, rt = Reader(), Reader()
    modules: dict[str, LoraModule] = {}
    rows, missed = [], []
    tot_sq = tot_err = 0.0
    pbar = bar(total=len(binfo), desc="extract", unit="tensor") if progress else None
    try:
        for name, bi in binfo.items():
            if pbar is not None:
                pbar.update(1)
            ti = tinfo.get(name)
            if ti is None:
                missed.append({"tensor": name, "why": "missing from the tuned model"})
                continue
            if list(ti.shape) != list(bi.shape):
                missed.append({"tensor": name, "why": f"shape changed {bi.shape} -> {ti.shape}"})
                continue
            if bi.dtype not in FLOAT_ST:
                continue
            d = _difference(rb, rt, bi, ti)
            if d is None:
                continue
            sq = _sum_sq(d)
            if sq == 0:
                continue
            module = name[: -len(".weight")] if name.endswith(".weight") else None
            if d.ndim != 2 or module is None:
                missed.append({"tensor": name, "why": "not a 2-D weight (LoRA cannot express it)",
                               "norm": sq**0.5})
                continue
            short = module.rsplit(".", 1)[-1]
            kind = "embedding" if short in EMBED_NAMES else "linear"
            transposed = kind == "embedding" or fifo_model
            dt = torch.from_numpy(d)  # no copy
            target = orient_delta(dt, transposed)  # B @ A orientation: (out, in), embedding (dim, num)
            u, s, vh = truncated_svd(target, rank, seed)
            k = min(rank, int(s.numel()))
            full_sq = sq
            if energy is not None:
                cum = torch.cumsum(s.double() ** 2, 0) / full_sq
                k = min(k, int((cum < energy - 1e-12).sum()) + 1)
            root = s[:k].sqrt()
            b = (u[:, :k] * root).contiguous()
            a = (root[:, None] * vh[:k]).contiguous()
            del u, s, vh, target, dt
            # the error in the stored orientation: d ≈ b @ a, or (b @ a)ᵀ = aᵀ @ bᵀ
            err_sq = _err_sq(d, a.T, b.T) if transposed else _err_sq(d, b, a)
            del d
            _give_back_freed_memory()
            modules[module] = LoraModule(name=module, A=a, B=b, scale=1.0, kind=kind,
                                         fan_in_fan_out=fifo_model and kind == "linear", r=k, alpha=float(k))
            rows.append({"module": module, "kind": kind, "rank": k, "norm": sq**0.5,
                         "rel_error": rel_error(sq, err_sq), "energy_kept": max(0.0, 1 - err_sq / sq)})
            tot_sq += sq
            tot_err += err_sq
        for name in tinfo:
            if name not in binfo:
                missed.append({"tensor": name, "why": "only in the tuned model"})
    finally:
        rb.close()
        rt.close()
        if pbar is not None:
            pbar.close()
    if not modules:
        raise AdapterHubError("no 2-D weight differs between the models: nothing a LoRA could hold")
    for m in missed:
        report.warn(f"not captured: {m['tensor']} ({m['why']})", notify)

    ranks = Counter(m.rank for m in modules.values())
    r = rank if rank in ranks else ranks.most_common(1)[0][0]
    pattern = {re.escape(n): m.rank for n, m in modules.items() if m.rank != r}
    cfg = lora_config(r=r, lora_alpha=r, rank_pattern=pattern,
                      alpha_pattern={k: float(v) for k, v in pattern.items()},
                      target_modules=sorted(modules), fan_in_fan_out=fifo_model,
                      base_model_name_or_path=_name_or_path(config) or str(base_dir.resolve()))
    adapter = LoraAdapter(config=cfg, modules=modules)
    params = {"rank": rank, "energy": energy, "seed": seed}
    recipe = extract_recipe(base_dir, tuned_dir, base_fingerprint=base_fp, tuned_fingerprint=tuned_fp,
                            params=params)
    summary = {"modules": len(modules), "rank": rank, "ranks": sorted(ranks), "energy": energy,
               "rel_error": rel_error(tot_sq, tot_err), "energy_kept": max(0.0, 1 - tot_err / tot_sq),
               "exact": tot_err <= 1e-10 * tot_sq, "not_captured": missed,
               "trainable_parameters": adapter.num_parameters()}
    prov = provenance.build("adapter", "extract", base_fingerprint=base_fp, base_name=cfg["base_model_name_or_path"],
                            method="extract", recipe=recipe, extra={"tuned_fingerprint": tuned_fp})
    recipe_text = dump_recipe(recipe)
    save_adapter(adapter, out, overwrite=overwrite, extra_files={
        "recipe.yaml": recipe_text,
        provenance.NAME: provenance.dumps(prov),
        "README.md": merge_adapter_card(base_model=cfg["base_model_name_or_path"], base_fingerprint=base_fp,
                                        recipe=recipe, recipe_text=recipe_text, summary=summary,
                                        warnings=report.warnings),
    })
    report.modules = rows
    report.summary = summary
    report.recipe = recipe
    report.fingerprint = {"base": base_fp, "tuned": tuned_fp}
    return report.finish()


def _name_or_path(config: dict) -> str | None:
    name = config.get("_name_or_path")
    return name if isinstance(name, str) and 0 < len(name) <= 1000 else None

