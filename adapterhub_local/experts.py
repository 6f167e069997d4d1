"""LoRA on MoE expert parameters (PEFT's ``target_parameters`` / ``lora.ParamWrapper``).

What PEFT 0.21 saves (peft/tuners/lora/layer.py, class ParamWrapper):

* an experts module whose 3-D parameter (E, d1, d2) is targeted gets ``lora_A`` of shape
  (E·r, in) and ``lora_B`` of shape (out, E·r) (ParamWrapper.update_layer). Without
  ``is_transposed`` on the experts class (Qwen3-MoE, Mixtral, ...) the parameter is
  (E, out, in); with it (GPT-OSS) (E, in, out) (ParamWrapper._get_in_out_features);
* ``lora_A`` rows are grouped by expert: expert e owns rows [e·r, (e+1)·r); ``lora_B``
  columns are interleaved: expert e owns columns e, E+e, 2E+e, ... (ParamWrapper.get_delta_weight:
  A.reshape(E, r, in), B.reshape(out, r, E)), so ΔW[e] = s · B[:, e::E] @ A[e·r:(e+1)·r];
* two targeted parameters of one module are two nested wrappers: the keys
  ``<module>.lora_A`` (outermost) and ``<module>.base_layer.lora_A`` (the next one in) belong
  to DIFFERENT parameters (tuners_utils.BaseTuner._inject_parameters wraps them in the
  module's parameter order). Which one is which is decided here from the shapes against
  the base model, never by stripping ``.base_layer.``; when shapes cannot tell, refused.

transformers 5 keeps the experts fused in memory (``experts.gate_up_proj`` (E, 2I, H),
``experts.down_proj`` (E, H, I)) but ``save_pretrained`` writes many models' checkpoints in
the per-expert layout (transformers/conversion_mapping.py: ``mlp.experts.N.gate_proj`` and
``up_proj`` concatenated on dim 1 into gate_up_proj, ``down_proj`` stacked; Mixtral's
``block_sparse_moe.experts.N.w1``/``w3``/``w2``). For such a base every expert's delta is an
ordinary LoRA delta on ``experts.N.<part>.weight`` (rows [o0, o1) of the fused slice), so
the streamed merge takes them as plain modules. A base that stores the fused 3-D tensor
itself gets one module per expert on slice [e] of that tensor (``LoraModule.expert``;
merge/stream.py adds each to its row of the (E, d1·d2) view); with ``is_transposed`` the slice
is (in, out), i.e. the delta transposed as for fan_in_fan_out. Which orientation the base
uses is read from the factors' shapes against the tensor (a square tensor takes its siblings').
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedAdapter
from .lora import LoraModule, module_rank_alpha, scaling

# fused parameter -> its per-expert parts, in the order they are concatenated (dim 1 of the
# fused tensor, i.e. the rows of one expert's (out, in) slice): one entry per naming scheme
SPLITS: dict[str, list[tuple[str, ...]]] = {
    "gate_up_proj": [("gate_proj", "up_proj"), ("w1", "w3")],
    "down_proj": [("down_proj",), ("w2",)],
}


# module paths the checkpoint uses instead of the in-memory one (transformers/conversion_mapping.py,
# "mixtral": WeightRenaming(".block_sparse_moe.", ".mlp."))
MODULE_RENAMES = [(".mlp.experts", ".block_sparse_moe.experts")]


@dataclass
class ExpertFactors:
    """One ParamWrapper's saved factors, before we know which parameter it wraps."""

    module: str  # the experts module, ".base_layer" segments removed
    depth: int  # 0: the outermost wrapper (key "<module>.lora_A"), 1: "<module>.base_layer.lora_A", ...
    A: object  # (E·r, in)
    B: object  # (out, E·r)

    @property
    def key(self) -> str:
        return self.module + ".base_layer" * self.depth


def is_expert_module(name: str, cfg: dict) -> bool:
    stripped = name.replace(".base_layer", "")
    for p in cfg.get("target_parameters") or []:
        mod = str(p).rpartition(".")[0]
        if mod and (stripped == mod or stripped.endswith("." + mod)):
            return True
    return False


def candidates(module: str, cfg: dict) -> list[str]:
    """Full parameter names that target_parameters points at on ``module``."""
    out = []
    for p in cfg.get("target_parameters") or []:
        mod, _, param = str(p).rpartition(".")
        if mod and (module == mod or module.endswith("." + mod)) and f"{module}.{param}" not in out:
            out.append(f"{module}.{param}")
    return out


def _per_expert_layout(param: str, infos) -> tuple[int, list[tuple[str, int, int]], int] | None:
    """(num_experts, [(disk module.part, row0, row1)], in_features) when the base stores ``param``
    per expert."""
    mem_module, _, name = param.rpartition(".")
    disk = [mem_module] + [mem_module.replace(a, b) for a, b in MODULE_RENAMES if a in mem_module + "."]
    for module, parts in ((m, p) for m in disk for p in SPLITS.get(name, [])):
        first = [f"{module}.0.{p}.weight" for p in parts]
        if not all(k in infos and len(infos[k].shape) == 2 for k in first):
            continue
        e = 0
        while all(f"{module}.{e}.{p}.weight" in infos for p in parts):
            e += 1
        rows, r0 = [], 0
        for p, k in zip(parts, first):
            o = int(infos[k].shape[0])
            rows.append((f"{module}.{{e}}.{p}", r0, r0 + o))
            r0 += o
        ins = {int(infos[k].shape[1]) for k in first}
        if len(ins) == 1:
            return e, rows, ins.pop()
    return None


def _layouts(names: list[str], infos) -> tuple[dict, dict[str, str]]:
    """{(param, orientation): (num_experts, [(module.part or fused key, row0, row1)], in_features)}
    and {param: fused key} for the params the base stores as one 3-D tensor. Orientation of a
    fused (E, d1, d2) tensor: False (E, out, in), True (E, in, out) (``is_transposed``), None
    when d1 == d2 and the shapes cannot tell; per-expert layouts are always False."""
    layouts: dict[tuple[str, bool | None], tuple] = {}
    fused: dict[str, str] = {}
    for p in names:
        keys = [f for f in [p] + [p.replace(a, b) for a, b in MODULE_RENAMES if a in p]
                if f in infos and len(infos[f].shape) == 3]
        if keys:
            fused[p] = keys[0]
            num, d1, d2 = (int(x) for x in infos[keys[0]].shape)
            for flip in ((None,) if d1 == d2 else (False, True)):
                o, i = (d2, d1) if flip else (d1, d2)
                layouts[(p, flip)] = (num, [(keys[0], 0, o)], i)
            continue
        lay = _per_expert_layout(p, infos)
        if lay is not None:
            layouts[(p, False)] = lay
    return layouts, fused


def expert_modules(where, cfg: dict, groups: list[ExpertFactors], infos) -> list[LoraModule]:
    """The per-expert LoRA modules of ``groups`` on a base with tensor ``infos``."""
    if not groups:
        return []
    use_rslora = bool(cfg.get("use_rslora"))
    out: list[LoraModule] = []
    by_module: dict[str, list[ExpertFactors]] = {}
    for g in groups:
        by_module.setdefault(g.module, []).append(g)
    for module, gs in sorted(by_module.items()):
        names = candidates(module, cfg)
        layouts, fused = _layouts(names, infos)
        taken: dict[str, tuple] = {}
        for g in sorted(gs, key=lambda g: g.depth):
            fits = []
            for (p, flip), (num, rows, inn) in layouts.items():
                r, alpha = module_rank_alpha(cfg, p)
                if (tuple(g.A.shape) == (num * r, inn) and tuple(g.B.shape) == (rows[-1][2], num * r)
                        and p not in taken):
                    fits.append((p, flip, num, rows, r, alpha))
            if len(fits) != 1:
                what = "no" if not fits else "more than one"
                raise UnsupportedAdapter(
                    where, f"expert LoRA {g.key} (lora_A {list(g.A.shape)}, lora_B {list(g.B.shape)}) fits {what} "
                    f"target parameter of the base ({', '.join(names) or 'target_parameters names none'})",
                    "is this the base it was trained on? (layouts known: fused experts.gate_up_proj/down_proj, "
                    "per expert gate_proj/up_proj/down_proj, w1/w3/w2)")
            taken[fits[0][0]] = (g, *fits[0][1:])
        # one experts class, one orientation: a square fused tensor takes its siblings' orientation
        flips = {v[1] for p, v in taken.items() if p in fused and v[1] is not None}
        if len(flips) > 1 or (not flips and any(v[1] is None for v in taken.values())):
            raise UnsupportedAdapter(where, f"{module}: cannot tell whether the fused expert tensors are stored "
                                     "(E, out, in) or (E, in, out) from their shapes",
                                     "merge it with PEFT itself (merge_and_unload)")
        flip = flips.pop() if flips else False
        for p, (g, _, num, rows, r, alpha) in sorted(taken.items()):
            s = scaling(r, alpha, use_rslora)
            for e in range(num):
                a = g.A[e * r : (e + 1) * r]
                b = g.B[:, e::num]
                if p in fused:  # slice [e] of the fused tensor: (out, in), or (in, out) when transposed
                    out.append(LoraModule(name=p, A=a, B=b, scale=s, r=r, alpha=alpha, fan_in_fan_out=flip,
                                          param=fused[p], expert=e))
                    continue
                for name, r0, r1 in rows:
                    out.append(LoraModule(name=name.format(e=e), A=a, B=b[r0:r1], scale=s, r=r, alpha=alpha))
    return out


def _rank_alpha(module: str, cfg: dict) -> tuple[int, float]:
    """(r, alpha) of an experts module's wrappers: the same for every parameter it may hold,
    else which one applies is only known on the base."""
    got = {module_rank_alpha(cfg, p) for p in candidates(module, cfg)}
    if len(got) != 1:
        raise UnsupportedAdapter(module, "expert LoRA whose parameters have different ranks (rank_pattern): "
                                 "which wrapper holds which parameter is only known on the base",
                                 "merge it into the base instead: adapters merge BASE_DIR REF --out DIR")
    return got.pop()


def cat_experts(inputs) -> tuple[list[ExpertFactors], dict[str, int]]:
    """Exact concatenation (``--method cat``) of expert LoRA: per expert e, A'ₑ = [wᵢsᵢAᵢₑ] and
    B'ₑ = [Bᵢₑ], packed back in PEFT's layout (A grouped by expert, B's columns interleaved),
    at rank R = Σrᵢ with alpha = R (scaling 1). ``inputs``: (adapter, weight) pairs, all with the
    same wrappers (PEFT requires the same target_parameters for every adapter of a model).
    Returns the factors and {target_parameters entry: R} for the new config's patterns."""
    import numpy as np

    from .lora import as_numpy

    keys = [sorted(g.key for g in ad.experts) for ad, _ in inputs]
    tps = [sorted(ad.config.get("target_parameters") or []) for ad, _ in inputs]
    if any(k != keys[0] for k in keys) or any(t != tps[0] for t in tps):
        raise UnsupportedAdapter(inputs[0][0].path or "adapter", "expert LoRA adapters with different "
                                 "target_parameters or wrappers cannot be concatenated (PEFT itself requires "
                                 "the same target_parameters for every adapter of one model)")
    out: list[ExpertFactors] = []
    ranks: dict[str, int] = {}
    for key in keys[0]:
        parts = []
        for ad, w in inputs:
            g = next(x for x in ad.experts if x.key == key)
            r, alpha = _rank_alpha(g.module, ad.config)
            s = scaling(r, alpha, bool(ad.config.get("use_rslora")))
            a, b = as_numpy(g.A, np.float32), as_numpy(g.B, np.float32)
            if a.shape[0] % r or b.shape[1] != a.shape[0]:
                raise UnsupportedAdapter(ad.path or "adapter", f"{key}: lora_A {list(a.shape)} is not E·r for r={r}")
            parts.append((a, b, r, np.float32(s * w)))
        num = {p[0].shape[0] // p[2] for p in parts}
        if len(num) != 1:
            raise UnsupportedAdapter(key, "adapters disagree on the number of experts")
        num = num.pop()
        total = sum(p[2] for p in parts)
        a_new = np.concatenate([np.concatenate([a[e * r:(e + 1) * r] * sw for a, _, r, sw in parts])
                                for e in range(num)])  # (E·R, in), grouped by expert
        b_e = [np.concatenate([b[:, e::num] for _, b, _, _ in parts], axis=1) for e in range(num)]  # (out, R) each
        b_new = np.ascontiguousarray(np.stack(b_e, axis=2).reshape(b_e[0].shape[0], total * num))  # col k·E+e
        module = key.replace(".base_layer", "")
        out.append(ExpertFactors(module, key.count(".base_layer"), np.ascontiguousarray(a_new), b_new))
        for p in tps[0]:
            if ranks.setdefault(p, total) != total:
                raise UnsupportedAdapter(key, "expert LoRA whose concatenated rank differs between layers "
                                         "(layer-wise rank_pattern) is not supported by cat")
    return out, ranks
