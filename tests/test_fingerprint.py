"""Fingerprints: sharding-independent, sensitive to one element, file hashes equal sha256sum."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import load_model, make_llama

from adapterhub_local.fingerprint import (
    cached_fingerprint,
    combine,
    fingerprint_model,
    tensor_digest,
)
from adapterhub_local.safetensors_io import read_header


@pytest.fixture
def model(tmp_path):
    return make_llama(tmp_path / "m", seed=5)


def test_same_after_resharding_and_renaming(model, tmp_path):
    fp1 = fingerprint_model(model, use_cache=False)
    resharded = tmp_path / "resharded"
    load_model(model).save_pretrained(resharded, max_shard_size="20KB")
    shards = [p for p in resharded.glob("*.safetensors")]
    assert len(shards) > 2, "the test must really produce several shards"
    fp2 = fingerprint_model(resharded, use_cache=False)
    assert fp2.fingerprint == fp1.fingerprint
    assert fp2.files != fp1.files
    renamed = tmp_path / "other-name"
    shutil.copytree(model, renamed)
    assert fingerprint_model(renamed, use_cache=False).fingerprint == fp1.fingerprint
    stored = load_file(model / "model.safetensors")
    assert fp1.num_parameters == sum(t.numel() for t in stored.values())
    assert fp1.num_tensors == len(stored) and fp1.architecture == "LlamaForCausalLM"


def test_one_element_changes_the_fingerprint(model):
    fp1 = fingerprint_model(model, use_cache=False)
    path = model / "model.safetensors"
    tensors = load_file(path)
    key = sorted(tensors)[3]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[7] += 1e-3
    save_file(tensors, path, metadata={"format": "pt"})
    fp2 = fingerprint_model(model, use_cache=False)
    assert fp2.fingerprint != fp1.fingerprint
    changed = [n for n in fp1.tensors if fp1.tensors[n] != fp2.tensors[n]]
    assert changed == [key]


def test_dtype_and_shape_are_part_of_the_digest():
    data = torch.arange(4, dtype=torch.float32).numpy().tobytes()
    assert tensor_digest("w", "F32", [4], data) != tensor_digest("w", "F32", [2, 2], data)
    assert tensor_digest("w", "F32", [4], data) != tensor_digest("w", "I32", [4], data)
    assert combine({"a": "1", "b": "2"}) == combine({"b": "2", "a": "1"})


def test_file_hashes_equal_sha256sum(model):
    fp = fingerprint_model(model, use_cache=False)
    for name, digest in fp.files.items():
        out = subprocess.run(["sha256sum", str(model / name)], capture_output=True, text=True, check=True)
        assert out.stdout.split()[0] == digest


def test_digest_matches_tensor_bytes(model):
    fp = fingerprint_model(model, use_cache=False)
    headers, _ = read_header(model / "model.safetensors")
    tensors = load_file(model / "model.safetensors")
    for name, t in tensors.items():
        info = headers[name]
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        assert fp.tensors[name] == tensor_digest(name, info.dtype, info.shape, raw)


def test_cache_by_path_size_mtime(model):
    fp1 = fingerprint_model(model)
    assert not fp1.cached
    fp2 = fingerprint_model(model)
    assert fp2.cached and fp2.fingerprint == fp1.fingerprint and fp2.files == fp1.files
    st = os.stat(model / "model.safetensors")
    os.utime(model / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cached_fingerprint(model) is None
    fp3 = fingerprint_model(model)
    assert not fp3.cached and fp3.fingerprint == fp1.fingerprint


def test_bf16_sharded_model_with_index(tmp_path):
    d = make_llama(tmp_path / "bf", dtype=torch.bfloat16, max_shard_size="30KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    fp = fingerprint_model(d, use_cache=False)
    assert fp.num_tensors == len(index["weight_map"])
    assert fp.dtype == "BF16"
    assert set(fp.files) == set(index["weight_map"].values())



@pytest.mark.parametrize("index, config", [
    ('{"weight_map": ["model.safetensors"]}', None),
    ('{"weight_map": {"w": 7}}', None),
    ('[1, 2]', None),
    (None, '[1, 2]'),
    (None, '{"architectures": "Llama", "model_type": {"x": 1}, "_name_or_path": 5}'),
])
def test_hostile_index_and_config_are_one_line_or_ignored(tmp_path, index, config):
    import sys
    from pathlib import Path

    import numpy as np

    from adapterhub_local.safetensors_io import save_safetensors

    d = tmp_path / "m"
    d.mkdir()
    save_safetensors({"w": np.ones((2, 2), np.float32)}, d / "model.safetensors")
    if index is not None:
        (d / "model.safetensors.index.json").write_text(index)
    if config is not None:
        (d / "config.json").write_text(config)
    exe = str(Path(sys.executable).parent / "adapters")
    r = subprocess.run([exe, "--registry", str(tmp_path / "h"), "fingerprint", str(d), "--json"],
                       capture_output=True, text=True)
    assert "Traceback" not in r.stderr, r.stderr
    if index is not None:
        assert r.returncode == 1 and r.stderr.strip().startswith("error:") and "index" in r.stderr
    else:
        fp = json.loads(r.stdout)
        assert r.returncode == 0 and fp["architecture"] is None and fp["model_type"] is None
