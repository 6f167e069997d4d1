"""Adapter algebra: combine LoRA adapters into a new PEFT adapter, in ΔW space.

* ``cat`` is exact: A = [A₁; …; Aₖ], B = [w₁s₁B₁ … wₖsₖBₖ], rank Σrᵢ.
* ``linear`` is Σ wᵢ·ΔWᵢ: exact via cat, or via svd when a rank is asked for.
* ``svd`` truncates the exact sum from its factors (QR of the stacked factors,
  then an SVD of the small Σr×Σr core): never a dense ΔW, exact at full rank.
* ``ties``, ``dare_*``, ``magnitude_prune`` need the dense ΔWᵢ of one module at a
  time, then a truncated SVD to ``rank``.

Every output module has scale 1 (lora_alpha = r, per-module rank_pattern and
alpha_pattern where ranks differ); the report gives per module and overall the
relative Frobenius error against the exact weighted sum and the energy kept.
The union of targets is used; a module an adapter lacks contributes zero.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import torch

from .. import provenance
from ..errors import AdapterHubError, ShapeMismatch
from ..fsutil import check_output
from ..lora import LoraModule, as_numpy, factored_sq_norm, stack_factors
from ..peft_format import LoraAdapter, lora_config, save_adapter
from .inputs import MergeInput
from .methods import get_method, module_generator
from .report import MergeReport, rel_error, stderr_notify


def _group(inputs: list[MergeInput]) -> dict[str, list[tuple[int, LoraModule, float]]]:
    groups: dict[str, list[tuple[int, LoraModule, float]]] = {}
    for i, inp in enumerate(inputs):
        for name, m in inp.adapter.modules.items():
            groups.setdefault(name, []).append((i, m, inp.weight))
    for name, mods in groups.items():
        first = mods[0][1]
        for i, m, _ in mods[1:]:
            if m.kind != first.kind:
                raise AdapterHubError(f"{name}: {inputs[i].ref} adapts it as {m.kind} but "
                                      f"{inputs[mods[0][0]].ref} as {first.kind}")
            if tuple(m.B.shape[:1]) + tuple(m.A.shape[1:]) != tuple(first.B.shape[:1]) + tuple(first.A.shape[1:]):
                raise ShapeMismatch(name, (first.B.shape[0], first.A.shape[1]), (m.B.shape[0], m.A.shape[1]),
                                    where=inputs[i].ref)
            if m.fan_in_fan_out != first.fan_in_fan_out:
                raise AdapterHubError(f"{name}: inputs disagree on fan_in_fan_out")
    return dict(sorted(groups.items()))


def _cat(mods) -> tuple[torch.Tensor, torch.Tensor]:
    return stack_factors([(m, w) for _, m, w in mods])


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int):
    root = s[:k].sqrt()
    b = (u[:, :k] * root).to(torch.float32).contiguous()
    a = (root[:, None] * vh[:k]).to(torch.float32).contiguous()
    return a, b


def factored_svd(a: torch.Tensor, b: torch.Tensor, rank: int):
    """Truncated SVD of b @ a from the factors: (A', B', kept energy, total energy)."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    qb, rb = torch.linalg.qr(b64)
    qa, ra = torch.linalg.qr(a64.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    u, vh = qb @ u, (qa @ vh.T).T
    k = max(0, min(rank, int(s.numel())))
    total = float((s**2).sum())
    kept = float((s[:k] ** 2).sum())
    a_out, b_out = _split(u, s, vh, k)
    return a_out, b_out, kept, total


def dense_svd(d: torch.Tensor, rank: int):
    d64 = d.to(torch.float64)
    u, s, vh = torch.linalg.svd(d64, full_matrices=False)
    k = max(0, min(rank, int(s.numel())))
    a_out, b_out = _split(u, s, vh, k)
    return a_out, b_out, float((s[:k] ** 2).sum()), float((s**2).sum())


def combine(inputs: list[MergeInput], method: str = "cat", rank: int | None = None,
            density: float | None = None, seed: int = 0, force: bool = False,
            notify=stderr_notify) -> tuple[LoraAdapter, MergeReport]:
    """The combined adapter in memory, and its report. Nothing is written."""
    m = get_method(method)
    report = MergeReport(operation="merge_adapters", method=method)
    live = [inp for inp in inputs if inp.weight != 0]  # weight 0 is a no-op, exactly
    if not live:
        raise AdapterHubError("every weight is 0: the result would be an empty adapter")
    if rank is not None and rank <= 0:
        raise AdapterHubError(f"--rank must be positive, got {rank}")
    if density is not None and not 0 < density <= 1:
        raise AdapterHubError(f"--density must be in (0, 1], got {density}")
    if method == "cat" and rank is not None:
        raise AdapterHubError("cat is exact at rank Σrᵢ and takes no --rank",
                              "use --method svd (or linear) --rank R to compress")
    via = "cat" if (method == "cat" or (method == "linear" and rank is None)) else "svd"
    if m.dense and density is None:
        density = 0.5
    if via == "svd" and rank is None:
        rank = max(max(i.adapter.ranks or [1]) for i in live)
        report.warn(f"--rank not given: using the largest input rank, {rank}", notify)
    _check_bases(live, force, report, notify)

    groups = _group(live)
    modules: dict[str, LoraModule] = {}
    rows = []
    tot_exact = tot_err = tot_kept = tot_energy = 0.0
    for name, mods in groups.items():
        first = mods[0][1]
        a_cat, b_cat = _cat(mods)
        row = {"module": name, "kind": first.kind, "inputs": {live[i].ref: {
            "rank": mm.rank, "weight": w, "norm": mm.delta_norm()} for i, mm, w in mods}}
        if via == "cat":
            a_out, b_out = a_cat, b_cat
            exact_sq = _frob_sq(a_cat, b_cat)
            err_sq, kept, energy = 0.0, exact_sq, exact_sq
        elif not m.dense:
            a_out, b_out, kept, energy = factored_svd(a_cat, b_cat, rank)
            exact_sq, err_sq = energy, max(energy - kept, 0.0)
        else:
            exact = (b_cat.to(torch.float64) @ a_cat.to(torch.float64))
            deltas = [mm.delta(orient=False) for _, mm, _ in mods]
            gens = [module_generator(seed, name, i) for i, _, _ in mods]
            dense = m.fn(deltas, [w for _, _, w in mods], density, gens)
            a_out, b_out, kept, energy = dense_svd(dense, rank)
            approx = b_out.to(torch.float64) @ a_out.to(torch.float64)
            exact_sq = float((exact**2).sum())
            err_sq = float(((exact - approx) ** 2).sum())
            row["method_error"] = rel_error(exact_sq, float(((exact - dense.to(torch.float64)) ** 2).sum()))
        row.update({"rank": int(a_out.shape[0]), "norm": exact_sq**0.5, "rel_error": rel_error(exact_sq, err_sq),
                    "energy_kept": (kept / energy) if energy > 0 else 1.0})
        rows.append(row)
        tot_exact += exact_sq
        tot_err += err_sq
        tot_kept += kept
        tot_energy += energy
        bias = None
        if any(mm.bias is not None for _, mm, _ in mods):
            bias = sum(mm.bias_delta(w) for _, mm, w in mods if mm.bias is not None)
        r = int(a_out.shape[0])
        if r == 0:
            continue
        modules[name] = LoraModule(name=name, A=a_out.contiguous(), B=b_out.contiguous(), scale=1.0,
                                   kind=first.kind, fan_in_fan_out=first.fan_in_fan_out, bias=bias,
                                   r=r, alpha=float(r))
    extra = _merge_extras(live, groups)
    adapter = LoraAdapter(config=_config(live, modules, extra), modules=modules, extra=extra)
    if adapter.config["lora_bias"]:
        for mod in modules.values():  # PEFT gives every lora_B a bias once lora_bias is on
            if mod.kind == "linear" and mod.bias is None:
                mod.bias = torch.zeros(mod.B.shape[0], dtype=torch.float32)
    report.modules = rows
    report.inputs = [{"ref": i.ref, "weight": i.weight, "ranks": i.adapter.ranks,
                      "modules": len(i.adapter.modules), "base_fingerprint": i.base_fingerprint} for i in inputs]
    report.summary = {
        "via": via, "exact": via == "cat" or (tot_err <= 1e-10 * max(tot_exact, 1e-30) and not m.dense),
        "rank": rank if via != "cat" else None, "ranks": sorted({mm.rank for mm in modules.values()}),
        "density": density if m.dense else None, "seed": seed if "seed" in m.params else None,
        "modules": len(modules), "rel_error": rel_error(tot_exact, tot_err),
        "energy_kept": (tot_kept / tot_energy) if tot_energy > 0 else 1.0,
        "trainable_parameters": adapter.num_parameters(),
    }
    return adapter, report


def _frob_sq(a: torch.Tensor, b: torch.Tensor) -> float:
    return factored_sq_norm(a, b)


def _check_bases(inputs: list[MergeInput], force: bool, report: MergeReport, notify) -> None:
    known = {i.ref: i.base_fingerprint for i in inputs if i.base_fingerprint}
    values = sorted(set(known.values()))
    if len(values) > 1:
        if not force:
            raise AdapterHubError(
                "the inputs were trained on different base models: "
                + "; ".join(f"{ref} on {fp}" for ref, fp in known.items()),
                "combine adapters of one base, or --force to combine anyway")
        report.warn(f"--force: inputs were trained on different bases ({', '.join(values)})", notify)
    for i in inputs:
        if not i.base_fingerprint:
            report.warn(f"{i.ref}: base unknown: cannot verify it shares a base with the others", notify)


def _merge_extras(inputs: list[MergeInput], groups) -> dict[str, torch.Tensor]:
    """modules_to_save tensors carry over; two different replacements of one tensor are an error."""
    extra: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    for inp in inputs:
        for key, t in inp.adapter.extra.items():
            if key in extra:
                if not np.array_equal(as_numpy(extra[key]), as_numpy(t)):
                    raise AdapterHubError(f"{key} is replaced (modules_to_save) by both {owner[key]} and "
                                          f"{inp.ref}", "two whole-tensor replacements cannot be combined")
                continue
            extra[key], owner[key] = t, inp.ref
    return extra


def _config(inputs: list[MergeInput], modules: dict[str, LoraModule], extra: dict) -> dict:
    first = inputs[0].adapter.config
    ranks = Counter(m.rank for m in modules.values())
    r = ranks.most_common(1)[0][0] if ranks else 1
    pattern = {re.escape(n): m.rank for n, m in modules.items() if m.rank != r}
    mts = sorted({k for i in inputs for k in (i.adapter.config.get("modules_to_save") or [])})
    bases = {i.adapter.base_model for i in inputs if i.adapter.base_model}
    return lora_config(
        r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern={k: float(v) for k, v in pattern.items()},
        target_modules=sorted(modules), use_rslora=False, use_dora=False,
        fan_in_fan_out=any(m.fan_in_fan_out for m in modules.values()),
        lora_bias=any(m.bias is not None for m in modules.values()),
        modules_to_save=mts or None, task_type=first.get("task_type", "CAUSAL_LM"),
        base_model_name_or_path=min(bases) if len(bases) == 1 else first.get("base_model_name_or_path"),
        bias="none",
    )


def merge_adapters(inputs: list[MergeInput], out, method: str = "cat", rank: int | None = None,
                   density: float | None = None, seed: int = 0, overwrite: bool = False,
                   force: bool = False, operation: str | None = None, extra_params: dict | None = None,
                   notify=stderr_notify) -> MergeReport:
    """Combine ``inputs`` with ``method`` and write a PEFT folder (plus recipe.yaml, README.md,
    adapterhub.json) at ``out``, atomically."""
    from ..card import merge_adapter_card
    from .recipe import algebra_recipe, dump_recipe

    check_output(out, [i.folder for i in inputs])  # never an input, inside or above one
    adapter, report = combine(inputs, method, rank, density, seed, force=force, notify=notify)
    verb = operation or (extra_params or {}).get("verb") or "merge"
    params = {"verb": verb, "rank": rank, "density": report.summary["density"], "seed": seed}
    if extra_params and "t" in extra_params:
        params["t"] = extra_params["t"]
    recipe = algebra_recipe(inputs, method=method, via=report.summary["via"], params=params)
    fps = sorted({i.base_fingerprint for i in inputs if i.base_fingerprint and i.weight != 0})
    prov = provenance.build("adapter", "merge", base_fingerprint=fps[0] if len(fps) == 1 else None,
                            base_name=adapter.base_model, method=method, parents=[i.ref for i in inputs],
                            inputs=recipe["inputs"], recipe=recipe, extra={"via": report.summary["via"]})
    recipe_text = dump_recipe(recipe)
    save_adapter(adapter, out, overwrite=overwrite, extra_files={
        "recipe.yaml": recipe_text,
        provenance.NAME: provenance.dumps(prov),
        "README.md": merge_adapter_card(base_model=adapter.base_model, base_fingerprint=provenance.base_fingerprint(prov),
                                        recipe=recipe, recipe_text=recipe_text, summary=report.summary,
                                        warnings=report.warnings),
    })
    report.output = str(out)
    report.recipe = recipe
    report.operation = verb if verb != "merge" else "merge_adapters"
    return report.finish()


def interpolate(a: MergeInput, b: MergeInput, t: float, out, rank: int | None = None, **kw) -> MergeReport:
    """(1-t)·ΔA + t·ΔB: exact (cat) by default, compressed by svd when ``rank`` is given."""
    if not 0 <= t <= 1:
        raise AdapterHubError(f"--t must be between 0 and 1, got {t}")
    a.weight, b.weight = 1.0 - t, t
    return merge_adapters([a, b], out, method="linear", rank=rank, operation="interpolate",
                          extra_params={"t": t}, **kw)


def stack(inputs: list[MergeInput], out, **kw) -> MergeReport:
    """The exact sum of the deltas (cat, weights 1 unless set)."""
    return merge_adapters(inputs, out, method="cat", operation="stack", **kw)
