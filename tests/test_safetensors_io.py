"""The one safetensors reader: every lie a header can tell is refused, by name, before use;
and what our writers produce, our reader (and safetensors) accept."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from clitools import one_line_error, run
from safetensors.torch import load_file, save_file
from tiny import make_peft_adapter

from adapterhub_local.cli import cli
from adapterhub_local.errors import InvalidAdapter, InvalidModel
from adapterhub_local.safetensors_io import (
    DTYPES,
    MAX_HEADER,
    check_encoded,
    encode_header,
    read_arrays,
    read_header,
    save_safetensors,
)


def split(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def rewrite(path, mutate) -> None:
    header, data = split(path)
    got = mutate(header, data)
    write(path, header, got if isinstance(got, bytes) else data)


def first_tensor(header: dict) -> str:
    return min(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]
    )


def second_tensor(header: dict) -> str:
    names = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]
    )
    return names[1]


def _set(field, value, which=first_tensor):
    def mutate(h, _):
        h[which(h)][field] = value

    return mutate


def _shape_lie(h, _):  # the range stays, the shape claims one more row
    name = first_tensor(h)
    h[name]["shape"][0] += 1


def _overlap(h, _):  # the second tensor's range starts inside the first's (same length)
    b = second_tensor(h)
    s, e = h[b]["data_offsets"]
    h[b]["data_offsets"] = [s - 4, e - 4]


def _dtype_lie(h, _):  # F32 -> F16: the byte count no longer matches
    h[first_tensor(h)]["dtype"] = "F16"


# case -> (mutation of (header, data), words the one error line must contain)
LIES = {
    "range_vs_shape": (_shape_lie, ["needs"]),
    "dtype_vs_range": (_dtype_lie, ["needs"]),
    "overlap": (_overlap, ["overlap"]),
    "negative_offset": (_set("data_offsets", [-8, 8]), ["data_offsets"]),
    "float_offset": (_set("data_offsets", [0.0, 8]), ["data_offsets"]),
    "negative_shape": (_set("shape", [-4, 2]), ["shape"]),
    "huge_shape": (_set("shape", [2**40, 2**40]), ["needs"]),
    "bool_shape": (_set("shape", [True, 2]), ["shape"]),
    "unknown_dtype": (_set("dtype", "Q4_K"), ["unknown dtype"]),
    "missing_field": (lambda h, _: h[first_tensor(h)].pop("shape"), ["no shape"]),
    "entry_not_object": (lambda h, _: h.__setitem__(first_tensor(h), [1, 2]), ["not an object"]),
    "metadata_not_strings": (
        lambda h, _: h.__setitem__("__metadata__", {"format": 1}),
        ["__metadata__"],
    ),
    "trailing_bytes": (lambda h, d: d + b"\0" * 8, ["after the last tensor"]),
    "truncated": (lambda h, d: d[:-3], ["truncated"]),
}


def _tensor_named(case) -> bool:
    return case not in ("metadata_not_strings", "trailing_bytes")


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "model.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "a.weight": torch.randn(4, 3, generator=g),
            "b.weight": torch.randn(2, 3, generator=g),
            "c.bias": torch.randn(3, generator=g),
        },
        path,
        metadata={"format": "pt"},
    )
    return path


@pytest.mark.parametrize("case", sorted(LIES))
def test_every_lie_is_refused_naming_file_and_tensor(shard, case):
    mutate, words = LIES[case]
    header, _ = split(shard)
    named = first_tensor(header) if case != "overlap" else second_tensor(header)
    rewrite(shard, mutate)
    with pytest.raises(InvalidModel) as e:
        read_header(shard)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(shard)), msg
    assert "truncated or corrupt" in msg
    for w in words:
        assert w in msg, (w, msg)
    if _tensor_named(case) and case != "truncated":
        assert json.dumps(named) in msg, msg
    with pytest.raises(InvalidAdapter):  # the adapter side: the same rules, its own error
        read_arrays(shard, InvalidAdapter)


@pytest.mark.parametrize(
    "raw,words",
    [
        (b"", "shorter than"),
        (struct.pack("<Q", 2**63) + b"{}", "exceeds"),
        (struct.pack("<Q", MAX_HEADER + 1) + b"{}", "exceeds"),
        (struct.pack("<Q", 64) + b"{}", "past the end"),
        (struct.pack("<Q", 8) + b"[1,2,3] ", "not a JSON object"),
        (struct.pack("<Q", 8) + b'{"a":1} ', "not an object"),
        (struct.pack("<Q", 16) + b'{"a":{},"a":{}} ', "appears twice"),
        (struct.pack("<Q", 8) + b"{\xff\xfe}    ", "not valid JSON"),
        (struct.pack("<Q", 4) + b"{x:1", "not valid JSON"),
    ],
)
def test_malformed_headers(tmp_path, raw, words):
    p = tmp_path / "x.safetensors"
    p.write_bytes(raw)
    with pytest.raises(InvalidModel, match=words):
        read_header(p)


def test_deep_nesting_and_nan_are_refused_without_a_crash(tmp_path):
    p = tmp_path / "x.safetensors"
    for body in (
        b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,0]}}',
    ):
        body += b" " * (-len(body) % 8)
        p.write_bytes(struct.pack("<Q", len(body)) + body)
        with pytest.raises(InvalidModel, match="truncated or corrupt"):
            read_header(p)


def test_empty_and_zero_sized_tensors_are_fine(tmp_path):
    p = tmp_path / "z.safetensors"
    save_file({"e": torch.zeros(0, 3), "w": torch.ones(2)}, p)
    infos, _ = read_header(p)
    assert infos["e"].shape == [0, 3] and infos["w"].end - infos["w"].start == 8
    arrays, meta, _ = read_arrays(p)
    assert arrays["e"].shape == (0, 3) and arrays["w"].tolist() == [1.0, 1.0] and meta == {}


def test_arrays_are_zero_copy_and_bf16_exact(tmp_path):
    p = tmp_path / "m.safetensors"
    x = torch.randn(5, 7)
    save_file(
        {"f": x, "b": x.bfloat16(), "h": x.half(), "i": torch.arange(6, dtype=torch.int64)}, p
    )
    arrays, _, infos = read_arrays(p)
    assert (
        np.array_equal(arrays["f"], x.numpy()) and arrays["f"].base is not None
    )  # a view of the map
    assert np.array_equal(arrays["b"], x.bfloat16().float().numpy())
    assert arrays["h"].dtype == np.float16 and arrays["i"].tolist() == list(range(6))
    arrays32, _, _ = read_arrays(p, float32=True)
    assert arrays32["h"].dtype == np.float32 and arrays32["i"].dtype == np.int64
    assert {i.dtype for i in infos.values()} == {"F32", "BF16", "F16", "I64"}
    t = torch.from_numpy(arrays["f"])  # what the algebra does: no copy
    assert t.data_ptr() == arrays["f"].__array_interface__["data"][0]


def test_dtype_table_matches_safetensors_and_torch():
    """Our one table agrees with torch's item sizes (torch writes through safetensors)."""
    for name, d in DTYPES.items():
        t = getattr(torch, d.torch, None)
        if t is None:
            continue
        assert torch.empty(0, dtype=t).element_size() == d.itemsize, name


def test_encode_header_refuses_what_the_reader_would(tmp_path):
    ok = encode_header([("a", "F32", [2, 2], 0, 16), ("b", "BF16", [3], 16, 22)], {"format": "pt"})
    p = tmp_path / "ok.safetensors"
    p.write_bytes(ok + bytes(22))
    assert set(read_header(p)[0]) == {"a", "b"}
    assert set(load_file(p)) == {"a", "b"}  # and safetensors agrees
    # a zero dimension anywhere makes zero bytes, however large the others (found by fuzzing)
    p.write_bytes(encode_header([("z", "BF16", [2**40, 0], 0, 0), ("y", "BF16", [1, 0], 0, 0)]))
    assert read_header(p)[0]["z"].shape == [2**40, 0]
    for bad in (
        [("a", "F32", [2, 2], 0, 12)],
        [("a", "F32", [2], 0, 8), ("b", "F32", [2], 4, 12)],
        [("a", "F77", [2], 0, 8)],
    ):
        with pytest.raises(AssertionError, match="refusing to write"):
            encode_header(bad)


def test_save_safetensors_checks_what_it_writes(tmp_path, monkeypatch):
    """save_safetensors (adapters, checkpoints) re-reads its bytes before writing them."""
    from safetensors.torch import save

    good = save({"a": torch.ones(2, 2)}, metadata={"format": "pt"})
    check_encoded(good)
    with pytest.raises(AssertionError, match="refusing to write"):
        check_encoded(good[:-1])
    monkeypatch.setattr("safetensors.torch.save", lambda *a, **k: good + b"\0")  # a writer bug
    with pytest.raises(AssertionError):
        save_safetensors({"a": torch.ones(2, 2)}, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ---- the CLI: a lying base shard, a lying adapter ----


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, llama_dir):
    return make_peft_adapter(llama_dir, tmp_path_factory.mktemp("ad") / "ad", r=4, lora_alpha=8)


@pytest.mark.parametrize(
    "case",
    [
        "range_vs_shape",
        "overlap",
        "negative_offset",
        "negative_shape",
        "huge_shape",
        "unknown_dtype",
    ],
)
def test_lying_base_shard_fingerprint_and_merge_refuse(case, llama_dir, adapter, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(llama_dir, base)
    shard = max(p for p in base.glob("*.safetensors"))
    rewrite(shard, LIES[case][0])
    one_line_error(
        run(["fingerprint", str(base), "--no-cache"], capsys), shard.name, "truncated or corrupt"
    )
    out = tmp_path / "out"
    one_line_error(
        run(["merge", str(base), str(adapter), "--out", str(out)], capsys),
        shard.name,
        "truncated or corrupt",
    )
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no .partial left


@pytest.mark.parametrize("case", ["overlap", "range_vs_shape", "unknown_dtype", "trailing_bytes"])
def test_lying_adapter_is_refused_by_inspect_and_merge(case, llama_dir, adapter, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    rewrite(bad / "adapter_model.safetensors", LIES[case][0])
    one_line_error(
        run(["inspect", str(bad)], capsys), "adapter_model.safetensors", "truncated or corrupt"
    )
    out = tmp_path / "out"
    one_line_error(
        run(["merge", str(llama_dir), str(bad), "--out", str(out)], capsys),
        "adapter_model.safetensors",
    )
    assert not out.exists()


def test_merge_output_passes_its_own_reader_and_safetensors(llama_dir, adapter, tmp_path):
    out = tmp_path / "merged"
    res = CliRunner().invoke(
        cli,
        ["merge", str(llama_dir), str(adapter), "--out", str(out), "--max-shard-size", "40KB"],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    for s in shards:
        infos, meta = read_header(s)
        assert meta == {"format": "pt"} and set(infos) == set(load_file(s))
    merged = tmp_path / "merged-adapter"
    res = CliRunner().invoke(
        cli,
        ["merge", str(adapter), str(adapter), "--into-adapter", "--out", str(merged)],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    infos, _ = read_header(merged / "adapter_model.safetensors", InvalidAdapter)
    assert infos


def test_reader_never_follows_a_symlink_or_opens_a_fifo(shard, tmp_path):
    import os

    from adapterhub_local.errors import AdapterHubError

    link = tmp_path / "link.safetensors"
    link.symlink_to(shard)
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    for p in (link, fifo):
        with pytest.raises(AdapterHubError) as e:
            read_header(p)
        assert str(p) in str(e.value) and "\n" not in str(e.value)
