"""Fuzzing our own parsers: the safetensors header reader, the adapter_config.json reader and
the rank/alpha pattern matcher. Whatever the input, the only outcomes are a result that obeys
the format's rules or one of our errors, and every example finishes quickly.

Bounded for CI by the "ci" hypothesis profile (tests/conftest.py); `make fuzz` runs the same
properties with HYPOTHESIS_PROFILE=long for minutes.
"""

from __future__ import annotations

import json
import re
import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from peft.utils.other import get_pattern_key

from adapterhub_local.adapter_config import parse_config
from adapterhub_local.errors import InvalidAdapter, InvalidModel, PatternError
from adapterhub_local.lora import pattern_key
from adapterhub_local.safetensors_io import DTYPES, encode_header, numel, read_arrays, read_header

pytestmark = pytest.mark.fuzz
SLOW = 2.0  # CPU seconds of this thread (load on a shared box does not count): far above any
# honest example, far below a hang
FIXTURES = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "x.safetensors"


def check_valid(path, infos: dict, meta: dict) -> None:
    """What a header that passed promises: ranges tile the data, sizes match, strings."""
    size = path.stat().st_size
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    pos = 8 + n
    for info in sorted(infos.values(), key=lambda i: (i.start, i.end)):
        assert info.dtype in DTYPES
        assert all(isinstance(s, int) and s >= 0 for s in info.shape)
        assert info.end - info.start == numel(info.shape) * DTYPES[info.dtype].itemsize
        if info.end > info.start:
            assert info.start == pos
            pos = info.end
    assert pos == size
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())


def read_both(path) -> None:
    """read_header and read_arrays: a valid result or InvalidModel, quickly."""
    t0 = time.thread_time()
    try:
        infos, meta = read_header(path)
    except InvalidModel as e:
        assert "\n" not in str(e)
    else:
        check_valid(path, infos, meta)
        try:
            arrays, _, _ = read_arrays(path)
        except InvalidModel:  # F8 tensors have no numpy form: refused, by name
            assert any(DTYPES[i.dtype].numpy is None and i.dtype != "BF16" for i in infos.values())
        else:
            for name, a in arrays.items():
                assert list(a.shape) == infos[name].shape
    assert time.thread_time() - t0 < SLOW


@FIXTURES
@given(st.binary(max_size=512))
@example(b"\x08" + b"\x00" * 7 + b"{}      ")
@example(struct.pack("<Q", 2**64 - 1))
def test_random_bytes(scratch, raw):
    scratch.write_bytes(raw)
    read_both(scratch)


@FIXTURES
@given(st.binary(max_size=300))
def test_random_header_bytes_with_a_plausible_length(scratch, body):
    scratch.write_bytes(struct.pack("<Q", len(body)) + body)
    read_both(scratch)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)
dtypes = st.sampled_from(sorted(DTYPES))
shapes = st.lists(st.integers(min_value=0, max_value=4), max_size=3)


@st.composite
def valid_files(draw):
    """(entries, data) of a valid safetensors file built with our own writer's header."""
    entries, pos = [], 0
    for i in range(draw(st.integers(min_value=0, max_value=4))):
        dtype, shape = draw(dtypes), draw(shapes)
        nbytes = numel(shape) * DTYPES[dtype].itemsize
        entries.append((f"t{i}", dtype, shape, pos, pos + nbytes))
        pos += nbytes
    return entries, draw(st.binary(min_size=pos, max_size=pos))


def _mutations(header: dict):
    names = [k for k in header if k != "__metadata__"]
    fields = ["dtype", "shape", "data_offsets"]
    return names, fields


@FIXTURES
@given(valid_files(), st.data())
def test_mutated_valid_headers(scratch, file, data):
    """A valid file, then one field of one entry (or the metadata, or a new key) replaced by
    an arbitrary JSON value, or a shape / offset nudged by a small amount."""
    entries, payload = file
    raw = encode_header(entries, {"format": "pt"})
    scratch.write_bytes(raw + payload)
    read_both(scratch)  # the unmutated file is valid
    header = json.loads(raw[8:])
    names, fields = _mutations(header)
    how = data.draw(st.sampled_from(["replace", "nudge", "metadata", "new_key", "drop"]))
    if how in ("replace", "nudge", "drop"):
        assume(names)
        name, field = data.draw(st.sampled_from(names)), data.draw(st.sampled_from(fields))
        if how == "replace":
            header[name][field] = data.draw(json_values)
        elif how == "drop":
            del header[name][field]
        elif field == "dtype":
            header[name][field] = data.draw(dtypes)
        else:
            vals = list(header[name][field])
            assume(vals)
            i = data.draw(st.integers(0, len(vals) - 1))
            vals[i] += data.draw(st.integers(-9, 9))
            header[name][field] = vals
    elif how == "metadata":
        header["__metadata__"] = data.draw(json_values)
    else:
        header[data.draw(st.text(max_size=6))] = data.draw(json_values)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    tail = data.draw(st.sampled_from([payload, payload[:-1], payload + b"\0"]))
    scratch.write_bytes(struct.pack("<Q", len(text)) + text + tail)
    read_both(scratch)


def config_outcome(text) -> dict | None:
    t0 = time.thread_time()
    try:
        cfg = parse_config(text, "adapter_config.json")
    except InvalidAdapter as e:
        assert "\n" not in str(e)
        cfg = None
    assert time.thread_time() - t0 < SLOW
    return cfg


@given(json_values)
def test_config_json_shapes(value):
    cfg = config_outcome(json.dumps(value))
    if cfg is not None:  # what passed has the types the math relies on
        assert isinstance(cfg, dict)
        for k in ("r", "lora_alpha"):
            if k in cfg:
                assert isinstance(cfg[k], (int, float)) and not isinstance(cfg[k], bool)
                assert np.isfinite(cfg[k])


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "r": json_values,
            "lora_alpha": json_values,
            "rank_pattern": json_values,
            "alpha_pattern": json_values,
            "target_modules": json_values,
            "use_rslora": json_values,
            "fan_in_fan_out": json_values,
            "peft_type": json_values,
            "modules_to_save": json_values,
        },
    )
)
def test_config_fields(cfg):
    got = config_outcome(json.dumps(cfg))
    if got is not None and "r" in got:
        assert 1 <= got["r"] <= 2**16


@given(st.text(max_size=200))
@example('{"r": 8, "lora_alpha": NaN}')
@example('{"a":' * 5000)
def test_config_random_text(text):
    config_outcome(text)


PATTERN_ALPHABET = "ab._()|*+?[]^$\\{},0123456789"


@given(st.text(alphabet=PATTERN_ALPHABET, max_size=12), st.text(alphabet="ab._", max_size=10))
@example("(a+)+$", "a" * 10 + "b")
@example("[]a]", "a")
@example("a{2}", "aa")
def test_pattern_key_agrees_with_peft(pattern, module):
    """On short names (where Python's backtracking still finishes) our RE2 matcher and PEFT's
    get_pattern_key agree; a key we refuse is one of our errors."""
    try:
        ours = pattern_key([pattern], module)
    except PatternError as e:
        assert "\n" not in str(e)
        return
    try:
        ref = get_pattern_key([pattern], module)
    except re.error:  # pragma: no cover - we compile the same spliced pattern first
        pytest.fail(f"we accepted {pattern!r}, which Python rejects")
    assert (ours if ours is not None else module) == ref, (pattern, module)


@given(st.text(alphabet=PATTERN_ALPHABET, max_size=16), st.integers(1000, 20_000))
@example("(a+)+$", 10_000)
@example("(a|aa)*$", 10_000)
def test_pattern_key_is_fast_on_long_names(pattern, n):
    module = "model." + "a" * n + "!"
    t0 = time.thread_time()
    try:
        pattern_key([pattern], module)
    except PatternError:
        pass
    assert time.thread_time() - t0 < SLOW
