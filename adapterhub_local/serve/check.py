"""`adapters check --for vllm`: predict a server's verdict on an adapter from the rules table.

Read-only and torch-free: the adapter's config and its safetensors header (names and
shapes) are all a loader looks at before the weights reach the GPU, and all we read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .facts import AdapterFacts, BaseFacts, TensorKind, safe
from .rules import Profile, get_profile, max_lora_rank_needed

# inits that change the base weights when PEFT builds the adapter (PEFT tuners/lora/layer.py)
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass
class Problem:
    rule: str
    message: str
    severity: str = "error"  # "error": not loaded, or not all of it applied; "warning": loads as PEFT serves it
    source: str = ""

    def to_dict(self) -> dict:
        return {"rule": self.rule, "message": self.message, "severity": self.severity, "source": self.source}


@dataclass
class CheckResult:
    target: str
    server: str
    version: str
    adapter: str
    max_rank: int
    max_lora_rank_needed: int
    modules: int
    problems: list[Problem] = field(default_factory=list)
    base: str | None = None
    rewrite_prefix: str | None = None  # OLD=NEW that makes every module name match the base

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "target": self.target, "server": self.server, "version": self.version,
                "adapter": self.adapter, "base": self.base, "max_rank": self.max_rank,
                "max_lora_rank_needed": self.max_lora_rank_needed, "modules": self.modules,
                "rewrite_prefix": self.rewrite_prefix, "problems": [p.to_dict() for p in self.problems]}


def _value_set(value, test: str) -> bool:
    if test == "not_none":
        return value is not None and value != "none"
    return bool(value)


def _config_rank(config: dict) -> int:
    """What vLLM compares with max_lora_rank: the largest of r and the rank_pattern values."""
    ranks = [config.get("r", 8)]
    patt = config.get("rank_pattern") or {}
    if isinstance(patt, dict):
        ranks += [v for v in patt.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return int(max(ranks))


def _config_problems(p: Profile, cfg: dict) -> list[Problem]:
    out: list[Problem] = []
    if p.name == "vllm":
        missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in cfg]
        if missing:  # PEFTHelper.from_dict: required fields (vllm/lora/peft_helper.py:146-164)
            out.append(Problem("config", f"adapter_config.json lacks {', '.join(missing)}",
                               source="vllm/lora/peft_helper.py:146-164 (from_dict)"))
    for rule in p.refused + p.ignored:
        value = cfg.get(rule.field)
        if _value_set(value, rule.test):
            msg = rule.message.format(value=value)
            if rule in p.ignored:
                msg = f"{p.server} {msg}"
            out.append(Problem(rule.rule, msg, source=rule.source))
    mts = cfg.get("modules_to_save") or []
    if isinstance(mts, str):
        mts = [mts]
    bad = [str(m) for m in mts if m not in p.modules_to_save_ok]
    if bad:
        how = "refused" if p.modules_to_save_refused else "never applied (the server serves the base module)"
        out.append(Problem("modules_to_save", f"modules_to_save {', '.join(safe(b) for b in bad)}: {how}",
                           source=p.modules_to_save_source))
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str):
        low = init.lower()
        if p.init_ok is not None and low not in p.init_ok:
            out.append(Problem("init_lora_weights", f"init_lora_weights={safe(init)!r} is refused: the adapter is "
                               "only right on the base PEFT modified at init (adapters convert --base converts it)",
                               source=p.init_source))
        elif p.init_ok is None and low.startswith(BASE_CHANGING_INITS):
            out.append(Problem("init_lora_weights", f"init_lora_weights={safe(init)!r} is never read: {p.server} "
                               "applies it to the unmodified base, a different ΔW (adapters convert --base "
                               "converts it)", source=p.init_source))
    return out


def _rank_problems(p: Profile, rank: int, max_lora_rank: int | None) -> list[Problem]:
    out: list[Problem] = []
    if p.allowed_ranks and rank > p.allowed_ranks[-1]:
        out.append(Problem("rank", f"LoRA rank {rank} is greater than {p.allowed_ranks[-1]}, the largest "
                           f"max_lora_rank {p.server} accepts (adapters convert --max-rank compresses it)",
                           source=p.rank_source))
    elif max_lora_rank is not None and rank > max_lora_rank:
        out.append(Problem("rank", f"LoRA rank {rank} is greater than max_lora_rank {max_lora_rank}",
                           source=p.rank_source))
    elif max_lora_rank is None and p.default_max_lora_rank and rank > p.default_max_lora_rank:
        need = max_lora_rank_needed(p, rank)
        out.append(Problem("rank", f"LoRA rank {rank} needs --max-lora-rank {need} (the default is "
                           f"{p.default_max_lora_rank})", severity="warning", source=p.rank_source))
    return out


def _tensor_problems(p: Profile, kinds: list[TensorKind], cfg: dict, already: set[str]) -> list[Problem]:
    out: list[Problem] = []
    by_kind: dict[str, list[TensorKind]] = {}
    for k in kinds:
        by_kind.setdefault(k.kind, []).append(k)
    refuses = p.name == "vllm"  # vLLM raises on names it cannot parse; the others leave them unused

    def add(rule: str, ks: list[TensorKind], what: str) -> None:
        if not ks or rule in already:
            return
        names = ", ".join(safe(k.name) for k in ks[:3]) + (f" (+{len(ks) - 3} more)" if len(ks) > 3 else "")
        how = "rejected (\"unsupported LoRA weight\")" if refuses else "never read"
        out.append(Problem(rule, f"{len(ks)} {what} tensor(s) {how}: {names}", source=p.tensor_source))

    add("dora", by_kind.get("dora", []), "DoRA magnitude")
    add("lora_bias", by_kind.get("lora_bias", []), "lora_B.bias")
    add("bias", by_kind.get("bias", []), "bias")
    mts = set(cfg.get("modules_to_save") or [])
    whole = by_kind.get("whole", [])
    saved = [k for k in whole if k.module.rsplit(".", 1)[-1] in mts or k.module in mts]
    add("modules_to_save", saved, "whole-module (modules_to_save)")
    add("tensor_name", [k for k in whole if k not in saved], "unrecognised")
    if not p.accepts_embedding_lora:
        add("embedding", by_kind.get("embedding", []), "embedding LoRA")
    skipped = by_kind.get("skipped", [])
    if skipped:
        out.append(Problem("skipped_weights", f"{len(skipped)} whole embedding weight(s) skipped on load: "
                           f"{', '.join(safe(k.name) for k in skipped[:2])}; fine only if they equal the base's",
                           severity="warning", source=p.skip_source))
    return out


def _prefix_fix(names: list[str], base: set[str]) -> str | None:
    """OLD=NEW such that replacing the leading OLD by NEW makes every module name a base module."""
    first = next((n for n in names if n not in base), None)
    if first is None:
        return None
    parts = first.split(".")
    tried = 0
    for b in sorted(base):
        bparts = b.split(".")
        # the longest common dotted suffix of the two names
        k = 0
        while k < min(len(parts), len(bparts)) and parts[-1 - k] == bparts[-1 - k]:
            k += 1
        if k == 0:
            continue
        old, new = ".".join(parts[: len(parts) - k]), ".".join(bparts[: len(bparts) - k])
        tried += 1
        if tried > 64:  # bounded: names are hostile input
            break
        if all(_rewrite(n, old, new) in base for n in names):
            return f"{old}={new}"
    return None


def _rewrite(name: str, old: str, new: str) -> str:
    if not old:
        return f"{new}.{name}" if new else name
    if name == old or not name.startswith(old + "."):
        return name
    rest = name[len(old) + 1:]
    return f"{new}.{rest}" if new else rest


def _base_problems(p: Profile, facts: AdapterFacts, kinds: list[TensorKind], base: BaseFacts,
                   result: CheckResult) -> list[Problem]:
    out: list[Problem] = []
    base_mods = base.modules()
    suffixes = {n.rsplit(".", 1)[-1] for n in base_mods}
    lora = {k.module: k for k in kinds if k.kind in ("lora", "embedding") and k.part == "A"}
    names = sorted(lora)
    unexpected = [n for n in names if n.rsplit(".", 1)[-1] not in suffixes]
    unmatched = [n for n in names if n not in base_mods]
    fix = _prefix_fix(names, set(base_mods)) if unmatched else None
    result.rewrite_prefix = fix
    hint = f"; adapters convert --rewrite-prefix {fix} fixes every name" if fix else ""
    if unexpected and p.unknown_module == "error":
        out.append(Problem("target_modules", f"{p.server} refuses to load: {len(unexpected)} module(s) are not "
                           f"LoRA layers of this base ({', '.join(safe(n) for n in unexpected[:3])})",
                           source=p.module_source))
    elif unmatched:
        out.append(Problem("module_match", f"loads but changes nothing for {len(unmatched)} of {len(names)} "
                           f"modules: their names match no layer of the base (e.g. {safe(unmatched[0])}){hint}",
                           source=p.module_source))
    for n in names:
        k = lora[n]
        if n not in base_mods:
            continue
        if k.kind == "embedding":
            if base.vocab_size is not None and len(k.shape) == 2 and k.shape[1] != base.vocab_size:
                out.append(Problem("vocab_size", f"{safe(n)}: embedding LoRA width {k.shape[1]} differs from the "
                                   f"base's vocabulary size {base.vocab_size}", source=p.vocab_source))
            continue
        b = facts.tensors.get(k.name.replace("lora_A", "lora_B"))
        want = base_mods[n]
        if b and len(k.shape) == 2:
            got = [b[1][0], k.shape[1]]
            if got != want and got[::-1] != want:
                out.append(Problem("shape", f"{safe(n)}: ΔW would be {got} but the base weight is {want}: "
                                   "an adapter for another base", source=p.module_source))
    for arch in base.architectures:
        if arch in p.no_lora_architectures:
            out.append(Problem("architecture", f"{p.server} serves {safe(arch)} without LoRA support",
                               severity="warning", source=p.no_lora_architectures[arch]))
    return out


def check_facts(facts: AdapterFacts, target: str = "vllm", base: BaseFacts | None = None,
                max_lora_rank: int | None = None) -> CheckResult:
    p = get_profile(target)
    cfg = facts.config
    kinds = facts.kinds(p.skipped_suffixes)
    tensor_rank = max(facts.module_ranks().values(), default=1)
    rank = max(_config_rank(cfg), tensor_rank)
    result = CheckResult(target=p.name, server=p.server, version=p.version, adapter=str(facts.folder),
                         max_rank=rank, max_lora_rank_needed=max_lora_rank_needed(p, rank),
                         modules=len({k.module for k in kinds if k.kind in ("lora", "embedding")}),
                         base=base.path if base else None)
    problems = _config_problems(p, cfg)
    problems += _rank_problems(p, rank, max_lora_rank)
    problems += _tensor_problems(p, kinds, cfg, {x.rule for x in problems})
    if base is not None:
        problems += _base_problems(p, facts, kinds, base, result)
    if not result.modules and not any(x.severity == "error" for x in problems):
        problems.append(Problem("empty", "no LoRA weights: the adapter changes nothing", source=p.tensor_source))
    result.problems = problems
    return result


def check(src: str | Path, target: str = "vllm", base_dir: str | Path | None = None,
          max_lora_rank: int | None = None) -> CheckResult:
    """Predict what ``target`` does with the PEFT folder ``src`` (library form of `adapters check`)."""
    p = get_profile(target)
    if max_lora_rank is not None:
        from ..errors import AdapterHubError

        if max_lora_rank <= 0 or (p.allowed_ranks and max_lora_rank not in p.allowed_ranks):
            valid = ", ".join(map(str, p.allowed_ranks)) if p.allowed_ranks else "a positive integer"
            raise AdapterHubError(f"{p.server} does not accept max_lora_rank {max_lora_rank}", f"valid: {valid}")
    facts = AdapterFacts.read(src)
    base = BaseFacts.read(base_dir) if base_dir is not None else None
    return check_facts(facts, target, base, max_lora_rank)


def serving_summary(adapter_dir: str | Path) -> str:
    """One line for a model card: the vLLM verdict. Never raises."""
    from .rules import VLLM

    try:
        r = check(Path(adapter_dir), "vllm")
    except Exception as e:  # a card must never fail because of this line
        return f"Serving: not checked against vLLM {VLLM.version} ({safe(str(e).splitlines()[0] if str(e) else e)})"
    if r.ok:
        return (f"Serving: vLLM ≥ {r.version} loads this adapter with max_lora_rank ≥ "
                f"{r.max_lora_rank_needed} (checked by adapters check --for vllm).")
    reasons = "; ".join(f"{x.rule}: {x.message}" for x in r.problems if x.severity == "error")
    return f"Serving: vLLM {r.version} will not serve this adapter as PEFT does: {reasons}."
