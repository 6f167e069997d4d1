"""What each LoRA server does with a PEFT adapter, as data, with the source it was read from.

A new server release is a change to this table, not to the checker. Each profile
says which ``adapter_config.json`` fields make the loader refuse the adapter
(``refused``), which ones it never reads although they change ΔW (``ignored``: it
loads and serves a different update, which we report as a problem, not a pass),
how it scales (rsLoRA, per-module patterns), which tensor names it accepts, skips
or rejects, and which ``max_lora_rank`` values it takes.

Sources are file and line ranges in the server's own repository, read for this
table (never copied). vLLM: the 0.33 state of vllm-project/vllm (``peft_helper.py``
with ``rank_pattern``/``alpha_pattern`` and the ``lora_bias``/``init_lora_weights``
/``layer_replication`` refusals, ``lora_model.py`` with ``MoEEPLoadSpec``).
SGLang: sgl-project/sglang ``python/sglang/srt/lora``. LoRAX: predibase/lorax at
a7394ba3 (2026-05-28), ``server/lorax_server``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FieldRule:
    """A config field that makes a difference: ``rule`` names it in every message."""

    rule: str
    field: str
    test: str  # "truthy" | "not_none" (bias: "not_none" means != "none")
    message: str
    source: str


@dataclass(frozen=True)
class Profile:
    name: str
    server: str
    version: str
    repo: str
    refused: tuple[FieldRule, ...]
    ignored: tuple[FieldRule, ...]
    # modules_to_save entries the loader accepts (anything else is refused, or ignored)
    modules_to_save_ok: frozenset[str]
    modules_to_save_source: str
    modules_to_save_refused: bool  # False: the replacements are silently not applied
    # init_lora_weights strings that load as a plain LoRA; None: the field is never read
    init_ok: frozenset[str] | None
    init_source: str
    honours_rslora: bool
    honours_patterns: bool
    scaling_source: str
    # max_lora_rank values the server accepts (None: any positive int)
    allowed_ranks: tuple[int, ...] | None
    default_max_lora_rank: int | None
    rank_setting: str | None  # the server's knob for the largest rank (None: there is none)
    rank_source: str
    # tensor names (after base_model.model.): accepted endings, and endings skipped on purpose
    accepts_embedding_lora: bool
    tensor_source: str
    skipped_suffixes: tuple[str, ...] = ()
    skip_source: str = ""
    # what a name that matches no layer does: "error" (load fails), "silent" (loads, unused)
    unknown_module: str = "silent"
    module_source: str = ""
    vocab_source: str = ""
    # architectures the server serves but without LoRA support (warning with --base)
    no_lora_architectures: dict[str, str] = field(default_factory=dict)
    # one uniform rank per adapter (or per layer type): patterns cannot be expressed
    uniform_rank: bool = False


_V = "vllm-project/vllm"
_PH = "vllm/lora/peft_helper.py"

VLLM = Profile(
    name="vllm", server="vLLM", version="0.33", repo=_V,
    refused=(
        FieldRule("dora", "use_dora", "truthy", "DoRA (use_dora) is refused: \"vLLM does not yet support DoRA\"",
                  f"{_PH}:65-66 (_validate_features)"),
        FieldRule("lora_bias", "lora_bias", "truthy", "lora_bias is refused (no bias on lora_B)",
                  f"{_PH}:67-68 (_validate_features)"),
        FieldRule("alora", "alora_invocation_tokens", "truthy", "Activated LoRA (alora_invocation_tokens) is refused",
                  f"{_PH}:78-79 (_validate_features)"),
        FieldRule("layer_replication", "layer_replication", "truthy", "layer_replication is refused",
                  f"{_PH}:80-81 (_validate_features)"),
        FieldRule("bdlora", "use_bdlora", "truthy", "block-diagonal LoRA (use_bdlora) is refused",
                  f"{_PH}:82-83 (_validate_features)"),
        FieldRule("qalora", "use_qalora", "truthy", "QALoRA (use_qalora) is refused",
                  f"{_PH}:84-85 (_validate_features)"),
        FieldRule("bias", "bias", "not_none", "bias={value!r} is refused: \"Adapter bias is not supported\" "
                  "(only bias=\"none\" loads)", f"{_PH}:190-191 (validate_legal)"),
    ),
    ignored=(),
    modules_to_save_ok=frozenset({"classifier", "score"}), modules_to_save_refused=True,
    modules_to_save_source=f"{_PH}:55-63 (_validate_features); the whole-tensor names are then rejected by "
    "vllm/lora/utils.py:162-171 (parse_fine_tuned_lora_name)",
    init_ok=frozenset({"gaussian", "eva", "orthogonal", "mica", "lora_ga"}),
    init_source=f"{_PH}:69-77, 88-99 (_init_is_supported)",
    honours_rslora=True, honours_patterns=True,
    scaling_source=f"{_PH}:101-144 (__post_init__, _scaling, _match_pattern, get_rank_and_scaling)",
    allowed_ranks=(1, 8, 16, 32, 64, 128, 256, 320, 512), default_max_lora_rank=16, rank_setting="max_lora_rank",
    rank_source=f"vllm/config/lora.py:24,32 (MaxLoRARanks, max_lora_rank = 16); {_PH}:183-189 "
    "(validate_legal: max of r and rank_pattern values)",
    accepts_embedding_lora=True,
    tensor_source="vllm/lora/utils.py:130-171 (parse_fine_tuned_lora_name); vllm/lora/lora_model.py:131-139, "
    "212-225 (from_lora_tensors, check_unexpected_modules)",
    skipped_suffixes=(".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight"),
    skip_source="vllm/lora/utils.py is_base_embedding_weights; vllm/lora/lora_model.py:132-133, 214-215",
    unknown_module="error",
    module_source="vllm/lora/lora_model.py:226-243 (last name part must be a LoRA module of the model); "
    "vllm/lora/model_manager.py activate_adapter (full names that match no layer are never applied)",
    vocab_source="vllm/lora/lora_model.py:145-154 (lora_embedding_A width == model vocab size)",
    no_lora_architectures={
        "GPT2LMHeadModel": "vllm/model_executor/models/gpt2.py: class GPT2LMHeadModel(nn.Module, SupportsPP), "
        "no SupportsLoRA",
    },
)

_SG = "python/sglang/srt/lora"
_SG_CFG = f"{_SG}/lora_config.py:26-60 (LoRAConfig reads target_modules, r, lora_alpha, use_dora, added tokens)"
_SG_SCALE = f"{_SG}/lora.py LoRAAdapter.__init__ (scaling = lora_alpha / r)"


def _ignored(rule: str, fld: str, test: str, what: str, source: str) -> FieldRule:
    return FieldRule(rule, fld, test, f"{what} is never read: the server serves a different ΔW", source)


def _config_fields_unread(source: str) -> tuple[FieldRule, ...]:
    """The LoraConfig fields a server whose config class lacks them (``source``) never reads."""
    return (
        _ignored("rank_pattern", "rank_pattern", "truthy", "rank_pattern", source),
        _ignored("alpha_pattern", "alpha_pattern", "truthy", "alpha_pattern", source),
        _ignored("lora_bias", "lora_bias", "truthy", "lora_bias", source),
        _ignored("bias", "bias", "not_none", "bias={value!r}", source),
        _ignored("layer_replication", "layer_replication", "truthy", "layer_replication", source),
    )


SGLANG = Profile(
    name="sglang", server="SGLang", version="main 2026", repo="sgl-project/sglang",
    refused=(
        FieldRule("dora", "use_dora", "truthy", "DoRA (use_dora) is refused", f"{_SG}/lora_manager.py "
                  "validate_new_adapter (use_dora)"),
    ),
    ignored=(
        _ignored("rslora", "use_rslora", "truthy", "use_rslora (alpha/sqrt(r))", _SG_SCALE),
        *_config_fields_unread(_SG_CFG),
    ),
    modules_to_save_ok=frozenset(), modules_to_save_refused=False, modules_to_save_source=_SG_CFG,
    init_ok=None, init_source=_SG_CFG,
    honours_rslora=False, honours_patterns=False, scaling_source=_SG_SCALE,
    allowed_ranks=None, default_max_lora_rank=None, rank_setting="--max-lora-rank",
    rank_source=f"{_SG}/lora_manager.py validate_new_adapter (memory_pool.can_support: rank <= --max-lora-rank)",
    accepts_embedding_lora=False, tensor_source=f"{_SG}/lora.py LoRAAdapter.initialize_weights",
    unknown_module="silent", module_source=f"{_SG}/lora.py LoRAAdapter.initialize_weights",
    uniform_rank=True,
)

_LX = "server/lorax_server"
_LX_CFG = f"{_LX}/adapters/lora.py:29-35, 74-84 (LoraConfig: r, target_modules, fan_in_fan_out, lora_alpha, use_rslora)"

LORAX = Profile(
    name="lorax", server="LoRAX", version="a7394ba3 (2026-05-28)", repo="predibase/lorax",
    refused=(),
    ignored=(
        _ignored("dora", "use_dora", "truthy", "DoRA (use_dora; magnitude vectors end up as unused weights)",
                 f"{_LX_CFG}; {_LX}/models/model.py:381-398 (unused adapter weights: a warning)"),
        *_config_fields_unread(_LX_CFG),
    ),
    modules_to_save_ok=frozenset(), modules_to_save_refused=False, modules_to_save_source=_LX_CFG,
    init_ok=None, init_source=_LX_CFG,
    honours_rslora=True, honours_patterns=False,
    scaling_source=f"{_LX}/adapters/lora.py:184-196, 399-407 (one get_scaling_factor(lora_alpha, r) for all "
    "modules, folded into lora_B)",
    allowed_ranks=None, default_max_lora_rank=None, rank_setting=None,
    rank_source=f"{_LX}/utils/punica.py:37-39, 46-86 (no hard limit: ranks padded for SGMV)",
    accepts_embedding_lora=False,
    tensor_source=f"{_LX}/adapters/lora.py:37-56 (only base_model.model.<weight>.lora_A/B.weight are mapped)",
    unknown_module="silent",
    module_source=f"{_LX}/adapters/lora.py:37-56; {_LX}/models/model.py:397-398 (unused weights: a warning)",
    uniform_rank=True,
)

PROFILES: dict[str, Profile] = {p.name: p for p in (VLLM, SGLANG, LORAX)}


def get_profile(name: str) -> Profile:
    from ..errors import AdapterHubError

    try:
        return PROFILES[name]
    except KeyError:
        raise AdapterHubError(f"unknown serving target {name!r}", f"valid: {', '.join(PROFILES)}") from None


def max_lora_rank_needed(profile: Profile, rank: int) -> int:
    """The smallest ``max_lora_rank`` the server accepts that is >= ``rank`` (capped at its largest)."""
    if not profile.allowed_ranks:
        return max(int(rank), 1)
    for allowed in profile.allowed_ranks:
        if allowed >= rank:
            return allowed
    return profile.allowed_ranks[-1]
