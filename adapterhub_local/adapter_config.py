"""Reading adapter_config.json: every value we use is checked before use (docs/validation.md).

The file is at most ``MAX_BYTES``, JSON with no key twice, no NaN / Infinity anywhere and at most
``MAX_DEPTH`` levels of nesting. The fields that decide the math must have PEFT's types and sane
values: ``r`` and every ``rank_pattern`` value an integer in [1, MAX_RANK]; ``lora_alpha`` and every
``alpha_pattern`` value a finite number with |alpha| <= MAX_ALPHA; the pattern keys regular
expressions we can match in bounded time (``lora.suffix_regex``); booleans booleans, names strings,
module lists lists of strings. Fields we do not use may hold anything JSON holds. A violation is one
``InvalidAdapter`` line naming the file and the field.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .errors import InvalidAdapter, PatternError

CONFIG_NAME = "adapter_config.json"
MAX_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 16
MAX_RANK = 1 << 16
MAX_ALPHA = 1e6

_PLAIN = re.compile(r"[A-Za-z0-9_\-]{1,40}")
BOOL_FIELDS = ("fan_in_fan_out", "use_rslora", "use_dora", "inference_mode", "lora_bias")
STR_FIELDS = ("peft_type", "bias")
OPTIONAL_STR_FIELDS = ("task_type", "base_model_name_or_path", "revision")
STR_LIST_FIELDS = ("modules_to_save", "target_parameters")
STR_OR_LIST_FIELDS = ("target_modules", "exclude_modules", "layers_pattern")


class _NonFinite:
    def __init__(self, text: str):
        self.text = text


def _no_duplicates(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {dup!r} appears twice")
    return d


def _walk(value, path: str, depth: int, where) -> None:
    """Depth bound and no NaN/Infinity anywhere (iterative over siblings, recursion bounded)."""
    if depth > MAX_DEPTH:
        shown = path if len(path) <= 40 else path[:37] + "…"
        raise InvalidAdapter(where, f"{shown or 'the file'} nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, _NonFinite):
        raise InvalidAdapter(where, f"{path}: {value.text} is not a finite number")
    if isinstance(value, dict):
        for k, v in value.items():
            name = k if _PLAIN.fullmatch(k) else _short(k)  # a key may hold any character
            _walk(v, f"{path}.{name}" if path else name, depth + 1, where)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _walk(v, f"{path}[{i}]", depth + 1, where)


def parse_config(text: str | bytes, where) -> dict:
    """The config object from the file's text, size, syntax, depth and every field checked."""
    if len(text) > MAX_BYTES:
        raise InvalidAdapter(where, f"{len(text)} bytes; an adapter config is at most {MAX_BYTES}")
    try:
        cfg = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_NonFinite)
    except RecursionError:
        raise InvalidAdapter(
            where, f"not valid JSON (nests deeper than {MAX_DEPTH} levels)"
        ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidAdapter(where, f"not valid JSON ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(cfg, dict):
        raise InvalidAdapter(where, "expected a JSON object")
    _walk(cfg, "", 0, where)
    check_config(cfg, where)
    return cfg


def _type(v) -> str:
    return (
        "null"
        if v is None
        else {
            dict: "an object",
            list: "a list",
            str: "a string",
            bool: "a boolean",
            int: "an integer",
            float: "a number",
        }.get(type(v), type(v).__name__)
    )


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_rank(v, field: str, where) -> int:
    if not _number(v) or (isinstance(v, float) and not v.is_integer()):
        raise InvalidAdapter(where, f"{field} must be an integer rank, got {_type(v)} {_short(v)}")
    if not 1 <= v <= MAX_RANK:
        raise InvalidAdapter(where, f"{field} must be between 1 and {MAX_RANK}, got {_short(v)}")
    return int(v)


def check_alpha(v, field: str, where) -> float:
    if not _number(v):
        raise InvalidAdapter(where, f"{field} must be a number, got {_type(v)} {_short(v)}")
    if not math.isfinite(float(v)) or abs(v) > MAX_ALPHA:
        raise InvalidAdapter(
            where,
            f"{field} must be a finite number with |{field}| <= {MAX_ALPHA:g}, got {_short(v)}",
        )
    return float(v)


def _short(v) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 60 else text[:57] + "…"


def _str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def check_config(cfg: dict, where) -> None:
    """Types and ranges of the fields whose values we use (see the module docstring)."""
    if "r" in cfg:
        check_rank(cfg["r"], "r", where)
    if "lora_alpha" in cfg:
        check_alpha(cfg["lora_alpha"], "lora_alpha", where)
    if cfg.get("lora_dropout") is not None:
        v = cfg["lora_dropout"]
        if not _number(v) or not 0 <= v <= 1:
            raise InvalidAdapter(where, f"lora_dropout must be a number in [0, 1], got {_short(v)}")
    for name in BOOL_FIELDS:
        if name in cfg and not isinstance(cfg[name], bool):
            raise InvalidAdapter(
                where, f"{name} must be true or false, got {_type(cfg[name])} {_short(cfg[name])}"
            )
    for name in STR_FIELDS:
        if name in cfg and not isinstance(cfg[name], str):
            raise InvalidAdapter(where, f"{name} must be a string, got {_type(cfg[name])}")
    for name in OPTIONAL_STR_FIELDS:
        if cfg.get(name) is not None and not isinstance(cfg[name], str):
            raise InvalidAdapter(where, f"{name} must be a string or null, got {_type(cfg[name])}")
    for name in STR_LIST_FIELDS:
        if cfg.get(name) is not None and not _str_list(cfg[name]):
            raise InvalidAdapter(
                where, f"{name} must be a list of strings or null, got {_type(cfg[name])}"
            )
    for name in STR_OR_LIST_FIELDS:
        v = cfg.get(name)
        if v is not None and not isinstance(v, str) and not _str_list(v):
            raise InvalidAdapter(
                where, f"{name} must be a string, a list of strings or null, got {_type(v)}"
            )
    v = cfg.get("layers_to_transform")
    if (
        v is not None
        and not (isinstance(v, int) and not isinstance(v, bool))
        and not (
            isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        )
    ):
        raise InvalidAdapter(
            where,
            f"layers_to_transform must be an integer, a list of integers or null, got {_type(v)}",
        )
    v = cfg.get("init_lora_weights")
    if v is not None and not isinstance(v, (bool, str)):
        raise InvalidAdapter(
            where, f"init_lora_weights must be true, false or a method name, got {_type(v)}"
        )
    _check_patterns(cfg, where)


def _check_patterns(cfg: dict, where) -> None:
    from .lora import suffix_regex

    for field, check in (("rank_pattern", check_rank), ("alpha_pattern", check_alpha)):
        patterns = cfg.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise InvalidAdapter(
                where, f"{field} must be an object (pattern -> value), got {_type(patterns)}"
            )
        for key, value in patterns.items():
            check(value, f"{field}[{_short(key)}]", where)
            try:
                suffix_regex(key)
            except PatternError as e:
                raise InvalidAdapter(where, f"{field} key {_short(key)}: {e.problem}") from None


def read_config(folder: Path) -> dict:
    """adapter_config.json of ``folder``, checked (size before reading, then everything else)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise InvalidAdapter(folder, f"no {CONFIG_NAME}", "is this a PEFT LoRA adapter folder?")
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except OSError as e:
        raise InvalidAdapter(path, f"cannot read ({e.strerror or e})") from None
    if len(data) > MAX_BYTES:
        raise InvalidAdapter(path, f"larger than {MAX_BYTES} bytes; an adapter config is not")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidAdapter(path, f"not valid JSON ({e})") from None
    return parse_config(text, path)
