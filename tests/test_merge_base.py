"""Merging adapters into a base model, checked against PEFT and independent arithmetic."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import (
    load_model,
    logits,
    make_gpt2,
    make_llama,
    make_peft_adapter,
    peft_logits,
)

from adapterhub_local.cli import cli, main
from adapterhub_local.fingerprint import fingerprint_model
from adapterhub_local.merge import resolve_inputs
from adapterhub_local.merge.base import merge_into_base
from adapterhub_local.merge.io import Reader


def state(model_dir: Path) -> dict[str, torch.Tensor]:
    from adapterhub_local.fingerprint import model_files

    out = {}
    for f in model_files(model_dir):
        out.update(load_file(f))
    return out


def peft_merged(base: Path, adapter: Path, dtype=torch.float32) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base, dtype), str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.endswith(".partial")]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("mllama") / "base", max_shard_size="40KB")


@pytest.fixture(scope="module")
def adapter(llama, tmp_path_factory):
    return make_peft_adapter(llama, tmp_path_factory.mktemp("mad") / "a1",
                             target_modules=["q_proj", "v_proj", "down_proj", "gate_proj"])


def test_equals_peft_merge_and_unload_and_logits(llama, adapter, tmp_path):
    out = tmp_path / "merged"
    report = merge_into_base(llama, resolve_inputs([str(adapter)]), out, max_shard_size="30KB",
                             progress=False)
    assert report.summary["shards"] > 1 and (out / "model.safetensors.index.json").is_file()
    ours = state(out)
    ref = peft_merged(llama, adapter)
    assert set(ours) == set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(ours[k], v, rtol=1e-6, atol=1e-6, msg=k)
    changed = [k for k in ref if not torch.equal(ours[k], state(llama)[k])]
    assert len(changed) == 8  # 4 targets x 2 layers: the test is not vacuous
    torch.testing.assert_close(logits(out), peft_logits(llama, adapter), rtol=1e-5, atol=1e-5)
    for name in ("config.json", "generation_config.json", "recipe.yaml", "README.md"):
        assert (out / name).is_file()
    card = (out / "README.md").read_text()
    assert "base_model_relation: merge" in card and "library_name: transformers" in card
    assert "adapterhub-local" in card and "operation: merge" in card


def test_streamed_fingerprint_equals_fingerprint_model(llama, adapter, tmp_path, monkeypatch):
    report = merge_into_base(llama, resolve_inputs([str(adapter)]), tmp_path / "m", progress=False)
    assert report.fingerprint["source"] == "computed while streaming"
    # the second merge reuses the cached fingerprint (untouched tensors then go through the
    # kernel's copy_file_range instead of our buffers) and writes the very same bytes
    again = merge_into_base(llama, resolve_inputs([str(adapter)]), tmp_path / "m2", progress=False)
    assert again.fingerprint["source"] == "cache" and again.fingerprint["base"] == report.fingerprint["base"]
    for f in (tmp_path / "m").iterdir():
        assert f.read_bytes() == (tmp_path / "m2" / f.name).read_bytes(), f.name
    monkeypatch.setenv("ADAPTERS_CACHE", str(tmp_path / "other-cache"))  # force a fresh hash
    assert report.fingerprint["base"] == fingerprint_model(llama, use_cache=False).fingerprint


def _with_provenance(adapter: Path, dest: Path, fp: str) -> Path:
    shutil.copytree(adapter, dest)
    (dest / "adapterhub.json").write_text(json.dumps({"base_fingerprint": fp}))
    return dest


def test_base_mismatch_refused_and_force_noted(llama, adapter, tmp_path):
    fp = fingerprint_model(llama).fingerprint
    ad = _with_provenance(adapter, tmp_path / "ad", fp)
    # verified against the cached fingerprint: no hashing at all
    rep = merge_into_base(llama, resolve_inputs([str(ad)]), tmp_path / "ok", progress=False)
    assert rep.fingerprint["source"] == "cache" and rep.fingerprint["verified"]

    bad = tmp_path / "bad-base"
    shutil.copytree(llama, bad)
    shard = max(bad.glob("model-*.safetensors"))
    tensors = load_file(shard)
    name = min(tensors)
    tensors[name].view(-1)[0] += 1.0  # one element changed
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["merge", str(bad), str(ad), "--out", str(out)])
    assert e.value.code == 1
    assert not out.exists() and no_leftovers(tmp_path)

    res = CliRunner().invoke(cli, ["merge", str(bad), str(ad), "--out", str(out), "--force"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    card = (out / "README.md").read_text()
    assert "--force" in card and fp in card


def test_mismatch_message_is_one_line(llama, adapter, tmp_path, capsys):
    ad = _with_provenance(adapter, tmp_path / "ad", "sha256:" + "0" * 64)
    with pytest.raises(SystemExit) as e:
        main(["merge", str(llama), str(ad), "--out", str(tmp_path / "o")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "sha256:" + "0" * 64 in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "o").exists() and no_leftovers(tmp_path)


def test_three_adapters_mixed_ranks_alphas_rslora_patterns(llama, tmp_path):
    a = make_peft_adapter(llama, tmp_path / "a", seed=1, r=4, lora_alpha=8,
                          target_modules=["q_proj", "v_proj"])
    b = make_peft_adapter(llama, tmp_path / "b", seed=2, r=8, lora_alpha=4, use_rslora=True,
                          target_modules=["q_proj", "o_proj", "up_proj"])
    c = make_peft_adapter(llama, tmp_path / "c", seed=3, r=2, lora_alpha=16,
                          rank_pattern={"v_proj": 6}, alpha_pattern={"layers.1.self_attn.v_proj": 3},
                          target_modules=["v_proj", "down_proj"])
    weights = [0.7, -0.4, 1.3]
    out = tmp_path / "m"
    res = CliRunner().invoke(cli, ["merge", str(llama), str(a), str(b), str(c), "--weights", "0.7,-0.4,1.3",
                                   "--out", str(out), "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["summary"]["modified"] > 0
    # independent: each adapter's delta taken from PEFT's own merge, summed in float64
    base = {k: v.double() for k, v in state(llama).items()}
    expect = {k: v.clone() for k, v in base.items()}
    for ad, w in zip((a, b, c), weights):
        merged = peft_merged(llama, ad)
        for k in expect:
            expect[k] += w * (merged[k].double() - base[k])
    ours = state(out)
    for k, v in expect.items():
        torch.testing.assert_close(ours[k].double(), v, rtol=1e-5, atol=1e-6, msg=k)


def test_gpt2_conv1d_lora_bias_and_tied_head(tmp_path):
    base = make_gpt2(tmp_path / "gpt2")
    ad = make_peft_adapter(base, tmp_path / "ad", target_modules=["c_attn", "c_fc"], lora_bias=True,
                           fan_in_fan_out=True)
    out = tmp_path / "m"
    merge_into_base(base, resolve_inputs([str(ad)]), out, progress=False)
    ref = peft_merged(base, ad)
    ours = state(out)
    for k in ours:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-6, atol=1e-6, msg=k)
    assert not torch.equal(ours["transformer.h.0.attn.c_attn.bias"], state(base)["transformer.h.0.attn.c_attn.bias"])
    assert "lm_head.weight" not in ours  # nothing touched the tied pair: stays tied
    torch.testing.assert_close(logits(out), peft_logits(base, ad), rtol=1e-5, atol=1e-5)


def test_embedding_lora_and_modules_to_save(llama, tmp_path):
    ad = make_peft_adapter(llama, tmp_path / "ad", target_modules=["embed_tokens", "q_proj"],
                           modules_to_save=["lm_head"])
    out = tmp_path / "m"
    merge_into_base(llama, resolve_inputs([str(ad)]), out, progress=False)
    ref = peft_merged(llama, ad)
    ours = state(out)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-6, atol=1e-6, msg=k)
    saved = load_file(ad / "adapter_model.safetensors")["base_model.model.lm_head.weight"]
    assert torch.equal(ours["lm_head.weight"], saved)
    torch.testing.assert_close(logits(out), peft_logits(llama, ad), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_tied_pair_is_untied_and_matches_peft_model(tmp_path, target):
    base = make_llama(tmp_path / "tied", tie=True)
    ad = make_peft_adapter(base, tmp_path / "ad", target_modules=[target, "q_proj"])
    out = tmp_path / "m"
    report = merge_into_base(base, resolve_inputs([str(ad)]), out, progress=False)
    assert report.summary["untied"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    ours = state(out)
    assert not torch.equal(ours["lm_head.weight"], ours["model.embed_tokens.weight"])
    torch.testing.assert_close(logits(out), peft_logits(base, ad), rtol=1e-5, atol=1e-5)


def test_two_replacements_of_one_tensor_is_an_error(llama, tmp_path, capsys):
    a = make_peft_adapter(llama, tmp_path / "a", modules_to_save=["lm_head"])
    b = make_peft_adapter(llama, tmp_path / "b", seed=5, modules_to_save=["lm_head"])
    with pytest.raises(SystemExit) as e:
        main(["merge", str(llama), str(a), str(b), "--out", str(tmp_path / "o")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "lm_head.weight" in err and "both" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_shape_mismatch_checked_before_work(tmp_path, capsys):
    small = make_llama(tmp_path / "small", hidden=32)
    big = make_llama(tmp_path / "big", hidden=64)
    ad = make_peft_adapter(big, tmp_path / "ad")
    with pytest.raises(SystemExit) as e:
        main(["merge", str(small), str(ad), "--out", str(tmp_path / "o")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "shape" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() and no_leftovers(tmp_path)


def test_bfloat16_single_cast_never_further_than_peft(tmp_path):
    base = make_llama(tmp_path / "bf16", dtype=torch.bfloat16)
    ad = make_peft_adapter(base, tmp_path / "ad", target_modules=["q_proj", "v_proj", "up_proj"])
    out = tmp_path / "m"
    merge_into_base(base, resolve_inputs([str(ad)]), out, progress=False)
    ours = state(out)
    peft = peft_merged(base, ad, dtype=torch.bfloat16)
    truth = peft_merged(base, ad, dtype=torch.float32)  # float32 arithmetic on the bf16 weights
    changed = 0
    for k, v in ours.items():
        assert v.dtype == torch.bfloat16
        t = truth[k].double()
        ours_err = (v.double() - t).abs()
        peft_err = (peft[k].double() - t).abs()
        assert bool((ours_err <= peft_err + 1e-7 * t.abs()).all()), k
        # one rounding of the float32 result: ours is the bf16 value nearest the float32 truth
        changed += int((v != truth[k].to(torch.bfloat16)).sum())
        # and never PEFT's old double rounding (delta cast to bf16 first, then added)
        base_k = state(base)[k]
        double = base_k + (truth[k] - base_k.float()).to(torch.bfloat16)
        assert ((double.double() - t).abs() >= ours_err - 1e-7 * t.abs()).all()
    total = sum(v.numel() for v in ours.values())
    assert changed <= max(2, total // 1000)  # float32 summation order may flip a near-tie, nothing more


def test_dtype_option_casts_and_updates_config(llama, adapter, tmp_path):
    out = tmp_path / "m"
    CliRunner().invoke(cli, ["merge", str(llama), str(adapter), "--out", str(out), "--dtype", "bfloat16"],
                       catch_exceptions=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    ours = state(out)
    ref = peft_merged(llama, adapter)
    flips = total = 0
    for k, v in ours.items():
        assert v.dtype == torch.bfloat16
        want = ref[k].to(torch.bfloat16)  # float32 math, one cast
        diff = v != want
        flips += int(diff.sum())
        total += v.numel()
        # a flip is a near-tie decided by float32 summation order: one bf16 step at most
        step = want.float().abs()[diff] * 2.0**-7
        assert bool(((v.float() - want.float()).abs()[diff] <= step + 1e-30).all()), k
    assert flips <= max(2, total // 1000)


def test_memory_holds_one_tensor_at_a_time(tmp_path, monkeypatch):
    base = make_llama(tmp_path / "deep", layers=8, max_shard_size="100KB")
    ad = make_peft_adapter(base, tmp_path / "ad", target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"])

    class Counting(Reader):
        def __init__(self):
            super().__init__()
            self.reads = []

        def view(self, info, offset, nbytes):
            self.reads.append((info.name, self.live))
            return super().view(info, offset, nbytes)

        def read_into(self, info, view, offset=0):
            self.reads.append((info.name, self.live))
            super().read_into(info, view, offset)

    reader = Counting()
    report = merge_into_base(base, resolve_inputs([str(ad)]), tmp_path / "m", progress=False, reader=reader)
    n_tensors = len(state(base))
    assert n_tensors > 70 and report.summary["tensors"] == n_tensors
    assert reader.max_live == 1  # never more than one base tensor's bytes held at once
    assert {name for name, _ in reader.reads} == set(state(base))
    assert max(live for _, live in reader.reads) == 1
    assert reader.max_tensor_bytes == max(v.numel() * 4 for v in state(base).values())
    # and not even one whole tensor: reads are row blocks, so a real model's buffers stay at a few MiB
    import adapterhub_local.merge.stream as mb

    reader = Counting()
    monkeypatch.setattr(mb, "BLOCK_ELEMS", 256)
    monkeypatch.setattr(mb, "CHUNK", 1000)
    merge_into_base(base, resolve_inputs([str(ad)]), tmp_path / "m2", progress=False, reader=reader)
    assert reader.max_read_bytes <= 256 * 4  # one float32 row block
    assert reader.max_tensor_bytes > 4 * 1000
    # same result whatever the block size (bytes may differ only if BLAS rounds differently per size)
    small, big = state(tmp_path / "m2"), state(tmp_path / "m")
    for k, v in big.items():
        torch.testing.assert_close(small[k], v, rtol=1e-6, atol=1e-7, msg=k)


def test_interrupt_leaves_nothing(llama, adapter, tmp_path):
    class Boom(Reader):
        n = 0

        def view(self, info, offset, nbytes):
            Boom.n += 1
            if Boom.n == 5:
                raise KeyboardInterrupt
            return super().view(info, offset, nbytes)

    out = tmp_path / "m"
    with pytest.raises(KeyboardInterrupt):
        merge_into_base(llama, resolve_inputs([str(adapter)]), out, progress=False, reader=Boom())
    assert not out.exists() and no_leftovers(tmp_path)


def test_recipe_replay_is_byte_identical(llama, adapter, tmp_path):
    b = make_peft_adapter(llama, tmp_path / "b", seed=9, r=2)
    first = tmp_path / "first"
    CliRunner().invoke(cli, ["merge", str(llama), str(adapter), str(b), "--weights", "0.5,2",
                             "--out", str(first), "--max-shard-size", "50KB"], catch_exceptions=False)
    again = tmp_path / "again"
    res = CliRunner().invoke(cli, ["merge", "--recipe", str(first / "recipe.yaml"), "--out", str(again)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    # a base that moved: replay on it by giving BASE_DIR; its fingerprint must still match
    moved = tmp_path / "moved-base"
    shutil.copytree(llama, moved)
    res = CliRunner().invoke(cli, ["merge", str(moved), "--recipe", str(first / "recipe.yaml"),
                                   "--out", str(tmp_path / "moved")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    for f in first.glob("model-*.safetensors"):
        assert f.read_bytes() == (tmp_path / "moved" / f.name).read_bytes()
    # a changed input is refused, not silently replayed
    other = make_peft_adapter(llama, tmp_path / "other", seed=10, r=2)
    shutil.copy(other / "adapter_model.safetensors", b / "adapter_model.safetensors")
    with pytest.raises(SystemExit) as e:
        main(["merge", "--recipe", str(first / "recipe.yaml"), "--out", str(tmp_path / "x")])
    assert e.value.code == 1


def test_weight_zero_and_unknown_base_warning(llama, adapter, tmp_path):
    out = tmp_path / "m"
    res = CliRunner().invoke(cli, ["merge", str(llama), str(adapter), "--weights", "0", "--out", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0
    assert "base unknown: cannot verify" in res.stderr
    ours, base = state(out), state(llama)
    assert all(torch.equal(ours[k], base[k]) for k in base)


def test_merge_does_not_import_transformers(llama, adapter, tmp_path):
    import subprocess
    import sys

    code = ("import sys; from adapterhub_local.merge import resolve_inputs, merge_into_base;"
            f"merge_into_base({str(llama)!r}, resolve_inputs([{str(adapter)!r}]), {str(tmp_path / 'o')!r},"
            " progress=False, notify=None);"
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_reads_sharded_index(llama):
    with safe_open(str(min(llama.glob("model-*.safetensors"))), "pt") as f:
        assert f.keys()
    assert (llama / "model.safetensors.index.json").is_file()


def test_write_failure_is_one_line_and_leaves_nothing(llama, adapter, tmp_path, monkeypatch, capsys):
    import errno
    import os as _os

    import adapterhub_local.merge.stream as st

    real = _os.write
    calls = {"n": 0}

    def full_disk(fd, data):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(st.os, "write", full_disk)
    with pytest.raises(SystemExit) as e:
        main(["merge", str(llama), str(adapter), "--out", str(tmp_path / "o")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() and no_leftovers(tmp_path)


def test_dora_merges_and_its_algebra_is_refused_with_one_line(llama, tmp_path, capsys):
    # DoRA merges into a base now (equal to PEFT: tests/test_variants_dora.py); what is still
    # refused is adding its update to another adapter's
    ad = make_peft_adapter(llama, tmp_path / "dora", use_dora=True)
    capsys.readouterr()  # building the adapter printed transformers' progress bars
    with pytest.raises(SystemExit) as e:
        main(["stack", str(ad), str(ad), "--out", str(tmp_path / "o")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DoRA" in err[0] and not (tmp_path / "o").exists()


def test_gpt2_tied_wte_lora_untied_matches_peft_model(tmp_path):
    base = make_gpt2(tmp_path / "g")
    ad = make_peft_adapter(base, tmp_path / "ad", target_modules=["wte", "c_attn"], fan_in_fan_out=True)
    out = tmp_path / "m"
    report = merge_into_base(base, resolve_inputs([str(ad)]), out, progress=False, notify=None)
    assert report.summary["untied"]
    ours = state(out)
    assert torch.equal(ours["lm_head.weight"], state(base)["transformer.wte.weight"])  # head keeps W
    torch.testing.assert_close(logits(out), peft_logits(base, ad), rtol=1e-5, atol=1e-5)


def test_float16_overflow_is_refused(llama, adapter, tmp_path, capsys):
    big = tmp_path / "big"
    shutil.copytree(adapter, big)
    t = load_file(big / "adapter_model.safetensors")
    t = {k: v * 1e7 if "lora_B" in k else v for k, v in t.items()}
    save_file(t, big / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SystemExit) as e:
        main(["merge", str(llama), str(big), "--dtype", "float16", "--out", str(tmp_path / "o")])
    assert e.value.code == 1
    assert "overflows float16" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and no_leftovers(tmp_path)


@pytest.mark.parametrize("verb", ["merge", "extract"])
def test_a_config_json_that_is_not_an_object_is_one_line(llama, adapter, tmp_path, capsys, verb):
    bad = tmp_path / "bad"
    shutil.copytree(llama, bad)
    (bad / "config.json").write_text("[1, 2]")
    args = ([str(bad), str(adapter)] if verb == "merge" else [str(bad), str(llama), "--rank", "2"])
    with pytest.raises(SystemExit) as e:
        main([verb, *args, "--out", str(tmp_path / "o")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "config.json" in err and "JSON object" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
