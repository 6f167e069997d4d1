"""Adapter algebra: combine LoRA adapters into a new PEFT adapter, in ΔW space.

* ``cat`` is exact: A = [A₁; …; Aₖ], B = [w₁s₁B₁ … wₖsₖBₖ], rank Σrᵢ.
* ``linear`` is Σ wᵢ·ΔWᵢ: exact via cat, or via svd when a rank is asked for.
* ``svd`` truncates the exact sum from its factors (R factors of the stacked
  factors from their Σr×Σr Gram matrices, then an SVD of the small core): never a
  dense ΔW, exact at full rank.
* ``ties``, ``dare_*``, ``magnitude_prune`` need the dense ΔWᵢ of one module at a
  time, then a truncated SVD to ``rank``.

Each method is an entry of methods.METHODS whose ``fn`` turns one module's stacked
inputs into its result; this module groups the inputs, calls it, and writes.

Every output module has scale 1 (lora_alpha = r, per-module rank_pattern and
alpha_pattern where ranks differ); the report gives per module and overall the
relative Frobenius error against the exact weighted sum and the energy kept.
The union of targets is used; a module an adapter lacks contributes zero.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import Counter

import numpy as np

from .. import provenance
from ..errors import AdapterHubError, ShapeMismatch
from ..fsutil import check_output
from ..lora import LoraModule, as_numpy
from ..peft_format import LoraAdapter, lora_config, save_adapter
from ..variants import refuse_dora_algebra
from .inputs import MergeInput
from .methods import Group, Options, get_method
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


def combine(inputs: list[MergeInput], method: str = "cat", rank: int | None = None,
            density: float | None = None, seed: int = 0, force: bool = False,
            notify=stderr_notify) -> tuple[LoraAdapter, MergeReport]:
    """The combined adapter in memory (float32 numpy factors), and its report. Nothing is written."""
    m = get_method(method)
    report = MergeReport(operation="merge_adapters", method=method)
    for inp in inputs:
        refuse_dora_algebra(inp.ref, inp.adapter, method)
    live = [inp for inp in inputs if inp.weight != 0]  # weight 0 is a no-op, exactly
    if not live:
        raise AdapterHubError("every weight is 0: the result would be an empty adapter")
    if rank is not None and rank <= 0:
        raise AdapterHubError(f"--rank must be positive, got {rank}")
    if density is not None and not 0 < density <= 1:
        raise AdapterHubError(f"--density must be in (0, 1], got {density}")
    if "rank" not in m.params and rank is not None:
        raise AdapterHubError(f"{method} is exact at rank Σrᵢ and takes no --rank",
                              "use --method svd (or linear) --rank R to compress")
    if m.dense and density is None:
        density = 0.5
    if rank is None and m.default_rank:
        rank = max(max(i.adapter.ranks or [1]) for i in live)
        report.warn(f"--rank not given: using the largest input rank, {rank}", notify)
    _check_bases(live, force, report, notify)

    opt = Options(rank=rank, density=density, seed=seed)
    modules: dict[str, LoraModule] = {}
    rows = []
    tot_exact = tot_err = tot_kept = tot_energy = 0.0
    via = "cat"
    for name, mods, res, norms in _each_module(m, _group(live), opt):
        first = mods[0][1]
        via = res.via
        r = int(res.a.shape[0])
        rows.append({"module": name, "kind": first.kind,
                     "inputs": {live[i].ref: {"rank": mm.rank, "weight": w, "norm": norm}
                                for (i, mm, w), norm in zip(mods, norms)},
                     **res.extra, "rank": r, "norm": res.exact_sq**0.5,
                     "rel_error": rel_error(res.exact_sq, res.err_sq),
                     "energy_kept": (res.kept / res.energy) if res.energy > 0 else 1.0})
        tot_exact += res.exact_sq
        tot_err += res.err_sq
        tot_kept += res.kept
        tot_energy += res.energy
        bias = None
        if any(mm.bias is not None for _, mm, _ in mods):
            bias = sum(as_numpy(mm.bias, np.float32) * np.float32(mm.scale * w)
                       for _, mm, w in mods if mm.bias is not None)
        if r == 0:
            continue
        modules[name] = LoraModule(name=name, A=np.ascontiguousarray(res.a), B=np.ascontiguousarray(res.b),
                                   scale=1.0, kind=first.kind, fan_in_fan_out=first.fan_in_fan_out, bias=bias,
                                   r=r, alpha=float(r))
    extra = _merge_extras(live)
    adapter = LoraAdapter(config=_config(live, modules, extra), modules=modules, extra=extra)
    if any(i.adapter.experts for i in live):  # MoE expert LoRA: exact cat only (experts.py)
        _add_experts(adapter, live)
    if adapter.config["lora_bias"]:
        for mod in modules.values():  # PEFT gives every lora_B a bias once lora_bias is on
            if mod.kind == "linear" and mod.bias is None:
                mod.bias = np.zeros(mod.B.shape[0], dtype=np.float32)
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


def _each_module(m, groups: dict, opt: Options):
    """(name, mods, result, input norms) per module, in name order. The factored methods run
    on a thread per core with ONE BLAS thread each: their matrices are small (R×R Grams, their
    eigh and SVD), and waking a BLAS thread pool costs more than they take (eigh of 48×48:
    0.4 ms on one thread, 30 ms with two on a busy two-core machine). The dense methods too:
    their work is O(n) passes and thin GEMMs over one module's ΔW (dense.py), and one BLAS
    thread keeps their randomised SVD independent of the thread count."""

    def one(name: str):
        g = Group.stack(name, groups[name])
        res = m.fn(g, opt)
        return name, g.mods, res, g.input_norms()

    from concurrent.futures import ThreadPoolExecutor

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a venv installed before it was a dependency: same results, slower
        def threadpool_limits(*_a, **_k):
            return contextlib.nullcontext()
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(max(1, min(n, 8))) as pool:
        yield from pool.map(one, groups)


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


def _merge_extras(inputs: list[MergeInput]) -> dict:
    """modules_to_save tensors carry over; two different replacements of one tensor are an error."""
    extra: dict = {}
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


def _add_experts(adapter: LoraAdapter, live: list[MergeInput]) -> None:
    from ..experts import cat_experts

    adapter.experts, ranks = cat_experts([(i.adapter, i.weight) for i in live])
    cfg = adapter.config
    cfg["target_parameters"] = sorted(live[0].adapter.config.get("target_parameters") or [])
    if not adapter.modules:
        cfg["target_modules"] = []
        cfg["r"] = cfg["lora_alpha"] = next(iter(ranks.values()), cfg["r"])
    for p, rank in ranks.items():
        if rank != cfg["r"]:
            cfg["rank_pattern"][re.escape(p)] = rank
            cfg["alpha_pattern"][re.escape(p)] = float(rank)


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
        "README.md": merge_adapter_card(base_model=adapter.base_model,
                                        base_fingerprint=provenance.base_fingerprint(prov),
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
