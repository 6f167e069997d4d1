"""adapter_config.json values are checked before use; rank/alpha pattern keys are matched by
PEFT's rule in time linear in the module name (RE2), and an unusable key is one error line."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from clitools import one_line_error, run
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file
from tiny import make_peft_adapter

from adapterhub_local.adapter_config import MAX_BYTES, parse_config
from adapterhub_local.errors import InvalidAdapter, PatternError
from adapterhub_local.lora import pattern_key


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, llama_dir):
    return make_peft_adapter(llama_dir, tmp_path_factory.mktemp("ad") / "ad", r=4, lora_alpha=8)


def spoiled(adapter, tmp_path, text: str):
    d = tmp_path / "bad"
    shutil.copytree(adapter, d)
    (d / "adapter_config.json").write_text(text)
    return d


def edited(adapter, tmp_path, **fields):
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(fields)
    return spoiled(adapter, tmp_path, json.dumps(cfg))


def config_text(adapter, replace: tuple[str, str]) -> str:
    text = json.dumps(json.loads((adapter / "adapter_config.json").read_text()))
    assert replace[0] in text
    return text.replace(*replace, 1)


# every command that reads an adapter refuses the same way
COMMANDS = {
    "inspect": lambda d, base, tmp: ["inspect", str(d)],
    "merge": lambda d, base, tmp: ["merge", str(base), str(d), "--out", str(tmp / "out")],
    "register": lambda d, base, tmp: ["register", str(d), "--name", "x"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e308"])
def test_non_finite_or_huge_alpha_is_refused(adapter, llama_dir, tmp_path, capsys, command, value):
    d = spoiled(
        adapter, tmp_path, config_text(adapter, ('"lora_alpha": 8', f'"lora_alpha": {value}'))
    )
    one_line_error(
        run(COMMANDS[command](d, llama_dir, tmp_path), capsys), "adapter_config.json", "lora_alpha"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_catastrophic_rank_pattern_key_finishes_fast(adapter, llama_dir, tmp_path, capsys, command):
    """(a+)+$ against a long module name: exponential with Python's re (30 a's take seconds,
    5000 would never end), linear with RE2. The module is an extra pair of factors whose name
    ends in '!', so the key never matches and r stays 4."""
    d = edited(adapter, tmp_path, rank_pattern={"(a+)+$": 4})
    module = "model." + "a" * 5000 + "!"
    tensors = load_file(d / "adapter_model.safetensors")
    tensors[f"base_model.model.{module}.lora_A.weight"] = torch.zeros(4, 8)
    tensors[f"base_model.model.{module}.lora_B.weight"] = torch.zeros(8, 4)
    save_file(tensors, d / "adapter_model.safetensors", metadata={"format": "pt"})
    t0 = time.perf_counter()
    code, out, err = run(COMMANDS[command](d, llama_dir, tmp_path), capsys)
    assert time.perf_counter() - t0 < 60
    if command == "merge":  # the base has no such module: refused by name, in one line
        one_line_error((code, out, err), "the base model does not have")
    else:
        assert code == 0, err
    assert pattern_key({"(a+)+$": 4}, module) is None
    assert pattern_key({"(a+)+$": 4}, "x." + "a" * 5000) == "(a+)+$"


@pytest.mark.parametrize(
    "key,words",
    [
        ("(?=q)q_proj", "bounded time"),  # lookahead
        (r"(q)\1_proj", "bounded time"),  # backreference
        ("(?>q_proj)", "bounded time"),  # atomic group
        ("q_proj[", "not a valid regular expression"),
        ("q{,3}_proj", "{0,n}"),
        ("x" * 2000, "longer than"),
    ],
)
@pytest.mark.parametrize("command", ["inspect", "merge"])
def test_unusable_pattern_key_is_one_line(
    adapter, llama_dir, tmp_path, capsys, key, words, command
):
    d = edited(adapter, tmp_path, alpha_pattern={key: 4})
    one_line_error(
        run(COMMANDS[command](d, llama_dir, tmp_path), capsys),
        "adapter_config.json",
        "alpha_pattern key",
        words,
    )


def test_pattern_key_is_peft_rule():
    keys = [
        "v_proj",
        r"layers\.1\.self_attn\.q_proj",
        "mlp\\..*_proj",
        "q_proj|k_proj",
        "layers.0.self_attn.q_proj",
    ]
    for module in [
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.3.mlp.up_proj",
        "model.layers.2.self_attn.k_proj",
        "xv_proj",
        "v_proj",
        "model.layers.10.self_attn.q_proj",
        "model.layers.0.self_attn.q_proj",
        "v_proj\n",
    ]:
        ref = get_pattern_key(keys, module)
        ours = pattern_key(keys, module)
        assert (ours if ours is not None else module) == ref, module
    with pytest.raises(PatternError, match="bounded time"):
        pattern_key(["(?<=a)b"], "ab")


BAD_CONFIGS = {
    "r_float": ({"r": 4.5}, "r must be an integer"),
    "r_zero": ({"r": 0}, "r must be between 1"),
    "r_huge": ({"r": 2**40}, "r must be between 1"),
    "r_bool": ({"r": True}, "r must be an integer"),
    "r_string": ({"r": "4"}, "r must be an integer"),
    "alpha_list": ({"lora_alpha": [8]}, "lora_alpha must be a number"),
    "rank_pattern_value": (
        {"rank_pattern": {"v_proj": "2"}},
        'rank_pattern["v_proj"] must be an integer',
    ),
    "rank_pattern_zero": (
        {"rank_pattern": {"v_proj": 0}},
        'rank_pattern["v_proj"] must be between 1',
    ),
    "alpha_pattern_huge": (
        {"alpha_pattern": {"v_proj": 1e300}},
        'alpha_pattern["v_proj"] must be a finite',
    ),
    "rank_pattern_list": ({"rank_pattern": ["v_proj", 2]}, "rank_pattern must be an object"),
    "bool_field": ({"use_rslora": "yes"}, "use_rslora must be true or false"),
    "fifo_int": ({"fan_in_fan_out": 1}, "fan_in_fan_out must be true or false"),
    "target_dict": (
        {"target_modules": {"q": 1}},
        "target_modules must be a string, a list of strings",
    ),
    "target_ints": (
        {"target_modules": [1, 2]},
        "target_modules must be a string, a list of strings",
    ),
    "mts_string": ({"modules_to_save": "lm_head"}, "modules_to_save must be a list of strings"),
    "base_obj": ({"base_model_name_or_path": {"a": 1}}, "base_model_name_or_path must be a string"),
    "peft_type_list": ({"peft_type": ["LORA"]}, "peft_type must be a string"),
    "dropout": ({"lora_dropout": 3}, "lora_dropout must be a number in [0, 1]"),
    "layers": ({"layers_to_transform": ["0"]}, "layers_to_transform must be"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_field_types_name_the_field(adapter, tmp_path, capsys, case):
    fields, words = BAD_CONFIGS[case]
    d = edited(adapter, tmp_path, **fields)
    one_line_error(run(["inspect", str(d)], capsys), "adapter_config.json", words)


@pytest.mark.parametrize(
    "text,words",
    [
        ("[1, 2]", "expected a JSON object"),
        ('{"r": 4, "r": 8}', "appears twice"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
        ('{"a": ' + "[" * 20 + "]" * 20 + "}", "nests deeper"),
        ('{"extra": {"x": NaN}}', "extra.x: NaN is not a finite number"),
        ('{"r": 1' + "0" * 5000 + "}", "not valid JSON"),
    ],
)
def test_malformed_json_shapes(text, words, tmp_path):
    with pytest.raises(InvalidAdapter, match=words.replace("[", r"\[").replace(".", r"\.")):
        parse_config(text, tmp_path / "adapter_config.json")


def test_oversized_config_is_refused_before_parsing(adapter, tmp_path, capsys):
    d = spoiled(adapter, tmp_path, '{"pad": "' + "x" * MAX_BYTES + '"}')
    one_line_error(run(["inspect", str(d)], capsys), "adapter_config.json", "larger than")


def test_valid_configs_still_load(adapter, tmp_path):
    """PEFT's own shapes pass: integral float ranks, string target_modules, null fields."""
    cfg = parse_config(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 8.0,
                "lora_alpha": 16,
                "target_modules": "q_proj",
                "task_type": None,
                "layers_to_transform": 1,
                "init_lora_weights": "gaussian",
                "alpha_pattern": {"v_proj": 2.5},
                "megatron_config": None,
            }
        ),
        tmp_path,
    )
    assert cfg["r"] == 8.0
