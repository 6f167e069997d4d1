"""`adapters convert --for TARGET`: write an adapter the server loads with the ΔW PEFT serves.

Phases: check (the rules table says what the server would do) -> refuse what no rewrite
can make equivalent -> load factors -> rewrite (undo a base-changing init, rename,
compress, fold scales) -> verify every module's ΔW as the server computes it against the
ΔW PEFT serves -> write atomically with provenance. Nothing is written on refusal.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import AdapterHubError
from ..lora import module_rank_alpha, scaling
from ..merge.report import MergeReport, rel_error, stderr_notify
from ..peft_format import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from .check import BASE_CHANGING_INITS, check_facts
from .facts import AdapterFacts, safe
from .rules import get_profile, max_lora_rank_needed

# problems a rewrite can remove, per kind of target: "native" keeps the config's meaning
# (vLLM honours rsLoRA and patterns), "fold" writes one global scale (LoRAX, SGLang)
_FIXABLE = {"native": {"rank", "init_lora_weights"},
            "fold": {"rank", "init_lora_weights", "rslora", "rank_pattern", "alpha_pattern"}}


def _mode(target: str) -> str:
    return "native" if target == "vllm" else "fold"


def _refuse(p, result, base_dir, max_rank) -> None:
    fixable = _FIXABLE[_mode(p.name)]
    for prob in result.problems:
        if prob.severity != "error":
            continue
        if prob.rule not in fixable:
            raise AdapterHubError(f"cannot convert for {p.server}: {prob.rule}: {prob.message}")
        if prob.rule == "init_lora_weights" and base_dir is None:
            raise AdapterHubError(f"cannot convert for {p.server}: {prob.rule}: {prob.message}")
        if prob.rule == "rank" and max_rank is None and p.allowed_ranks:
            raise AdapterHubError(f"cannot convert for {p.server}: rank: {prob.message}",
                                  f"add --max-rank {p.allowed_ranks[-1]} (or lower) to compress it")


def _load_mods(facts: AdapterFacts, cfg: dict):
    from safetensors.torch import load_file

    from .transforms import Mod

    # the header was validated by the project's reader when the facts were read
    tensors = load_file(facts.folder / WEIGHTS_NAME)
    use_rslora = bool(cfg.get("use_rslora"))
    fifo = bool(cfg.get("fan_in_fan_out"))
    mods: dict[str, Mod] = {}
    other: dict[str, object] = {}
    for k in facts.kinds(get_profile("vllm").skipped_suffixes):
        if k.kind not in ("lora", "embedding") or k.part != "A":
            if k.kind not in ("lora", "embedding"):
                other[k.name] = tensors[k.name]
            continue
        b_name = k.name.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
        if b_name not in tensors:
            raise AdapterHubError(f"{safe(k.module)}: has {k.part} but no B factor")
        a, b = tensors[k.name], tensors[b_name]
        r, alpha = module_rank_alpha(cfg, k.module)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            raise AdapterHubError(f"{safe(k.module)}: factors {list(a.shape)} and {list(b.shape)} disagree with "
                                  f"r={r} from adapter_config.json")
        kind = "embedding" if k.kind == "embedding" else "linear"
        mods[k.module] = Mod(k.module, kind, a, b, r, alpha, scaling(r, alpha, use_rslora),
                             fan_in_fan_out=fifo and kind == "linear")
    return mods, other


def _served_scale(p, cfg: dict, name: str) -> float:
    """The scale the target applies to one module of the written config."""
    if p.honours_patterns:
        r, alpha = module_rank_alpha(cfg, name)
    else:
        r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    return scaling(r, alpha, bool(cfg.get("use_rslora")) and p.honours_rslora)


def _tensors(mods, other: dict) -> dict:
    out = {}
    for name, m in mods.items():
        if m.kind == "embedding":
            a_key, b_key = f"{PREFIX}{name}.lora_embedding_A", f"{PREFIX}{name}.lora_embedding_B"
        else:
            a_key, b_key = f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"
        out[a_key], out[b_key] = m.A.contiguous(), m.B.contiguous()
    out.update(other)
    return out


def convert(src: str | Path, target: str, out: str | Path, *, max_rank: int | None = None,
            base_dir: str | Path | None = None, rewrite_prefix: str | None = None, overwrite: bool = False,
            parent: str | None = None, notify=stderr_notify) -> MergeReport:
    """Write ``src`` as an adapter ``target`` serves with the ΔW PEFT serves (library form of
    `adapters convert`). Raises AdapterHubError naming the feature when that is impossible."""
    import torch

    from ..fsutil import check_output
    from . import transforms as T

    p = get_profile(target)
    check_output(out, [src, base_dir])  # never an input, inside one, or above one
    facts = AdapterFacts.read(src)
    src_cfg = facts.config
    result = check_facts(facts, target)
    _refuse(p, result, base_dir, max_rank)
    init = src_cfg.get("init_lora_weights", True)
    base_changing = isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS)
    if base_dir is not None and not base_changing:
        raise AdapterHubError(f"--base is for adapters whose init changed the base (PiSSA, OLoRA, CorDA); "
                              f"this one has init_lora_weights={safe(str(init))!r}")
    if p.allowed_ranks and max_rank is not None and max_rank > p.allowed_ranks[-1]:
        raise AdapterHubError(f"--max-rank {max_rank} is above {p.allowed_ranks[-1]}, the largest max_lora_rank "
                              f"{p.server} accepts")

    report = MergeReport(operation="convert", method=target)
    cfg = dict(src_cfg)
    mods, other = _load_mods(facts, cfg)
    if not mods:
        raise AdapterHubError(f"{facts.folder}: no LoRA modules to convert")
    changes: list[str] = []
    if base_changing:
        cfg = T.undo_init(mods, cfg, Path(base_dir))
        changes.append(f"init_lora_weights={init} converted to a plain LoRA at rank x2 (PEFT's conversion)")
    # the reference: ΔW PEFT serves (on the original base), per module, as factors
    ref = {n: (m.A.to(torch.float32).clone(), m.scaled_b().clone()) for n, m in mods.items()}
    if rewrite_prefix:
        old, new = T.parse_rewrite(rewrite_prefix)
        before = list(mods)
        mods, cfg = T.rewrite_names(mods, cfg, old, new)
        ref = {m.name: ref[n] for n, m in zip(before, mods.values())}
        renamed = {}
        for key, t in other.items():
            short = key[len(PREFIX):] if key.startswith(PREFIX) else key
            if short == old or short.startswith(old + "."):
                short = ".".join(x for x in (new, short[len(old):].lstrip(".")) if x)
            renamed[PREFIX + short] = t
        other = renamed
        changes.append(f"module names {old}.* -> {new or '(none)'}.*")
    rows = []
    if max_rank is not None:
        rows = T.compress(mods, max_rank, bool(cfg.get("use_rslora")))
        if rows:
            changes.append(f"{len(rows)} module(s) compressed to rank {max_rank} (truncated SVD)")
    if _mode(target) == "fold":
        if p.name == "lorax" and other:
            report.warn(f"dropped {len(other)} tensor(s) {p.server} never reads", notify)
        other = {}
        big = T.fold(mods)
        cfg.update(r=big, lora_alpha=big, use_rslora=False, rank_pattern={}, alpha_pattern={})
        changes.append(f"per-module scales folded into lora_B; every module at rank {big}, lora_alpha = r")
    elif rows:
        cfg = T.explicit_config(cfg, mods, bool(cfg.get("use_rslora")))
    T.check_scales(mods, cfg)

    # verify: ΔW as the target computes it, from what we write, against PEFT's
    tot_exact = tot_err = 0.0
    worst = 0.0
    for name, m in mods.items():
        s = _served_scale(p, cfg, name)
        a_ref, b_ref = ref[name]
        exact_sq, err_sq = T.frob_sq_diff(a_ref, b_ref, m.A.to(torch.float32), m.B.to(torch.float32) * s)
        tot_exact += exact_sq
        tot_err += err_sq
        worst = max(worst, rel_error(exact_sq, err_sq))
        row = next((r for r in rows if r["module"] == name), None)
        if row is not None:
            row.pop("exact_sq", None), row.pop("err_sq", None)
    lossy = bool(rows)
    if not lossy and worst > 1e-5:  # a bug, never a user error: refuse to write a wrong adapter
        raise AssertionError(f"convert: ΔW differs by {worst:.3g} (relative) without a lossy option")

    from .. import provenance
    from ..fsutil import atomic_dir
    from ..safetensors_io import save_safetensors

    out = Path(out)
    src_prov = provenance.read(facts.folder)
    prov = provenance.build(
        "adapter", "convert", base_fingerprint=provenance.base_fingerprint(src_prov),
        base_name=cfg.get("base_model_name_or_path"), method="convert",
        parents=[parent or str(Path(facts.folder).resolve())],
        extra={"target": f"{p.server} {p.version}", "changes": changes})
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_safetensors(_tensors(mods, other), tmp / WEIGHTS_NAME, metadata={"format": "pt"}, fsync=False)
        if cfg == src_cfg:
            (tmp / CONFIG_NAME).write_bytes((facts.folder / CONFIG_NAME).read_bytes())
        else:
            (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        (tmp / provenance.NAME).write_text(provenance.dumps(prov), encoding="utf-8")

    ranks = sorted({m.rank for m in mods.values()})
    report.output = str(out)
    report.modules = rows
    report.summary = {
        "server": p.server, "version": p.version, "changes": changes, "exact": not lossy,
        "rel_error": rel_error(tot_exact, tot_err), "max_module_rel_error": worst,
        "energy_kept": 1.0 - (tot_err / tot_exact if tot_exact > 0 else 0.0),
        "ranks": ranks, "max_lora_rank_needed": max_lora_rank_needed(p, max(ranks)), "modules": len(mods),
    }
    if lossy and not math.isfinite(report.summary["rel_error"]):
        report.summary["rel_error"] = None
    return report.finish()
