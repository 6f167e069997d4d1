"""`adapters check --for vllm` and `adapters convert`: verdicts on adapters PEFT builds, and ΔW
of converted adapters computed the way each server computes it (its tensor names, its
scaling rule), against the ΔW PEFT serves (PeftModel merged, minus the base)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import load_model, make_llama, make_peft_adapter

from adapterhub_local.cli import main

PREFIX = "base_model.model."


@dataclass
class Result:
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run(*args, code=0) -> Result:
    """The real entry point (errors become one line and an exit code), output captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(map(str, args)))
            rc = 0
        except SystemExit as e:
            rc = e.code or 0
    res = Result(out.getvalue(), err.getvalue())
    assert rc == code, res.output
    assert "Traceback" not in res.output
    return res


def check_json(*args, code=0) -> dict:
    return json.loads(run("check", *args, "--json", code=code).stdout)


def rules(report: dict, severity: str | None = None) -> set[str]:
    return {p["rule"] for p in report["problems"] if severity is None or p["severity"] == severity}


# --- the reference and the servers' arithmetic -------------------------------------------------

def peft_delta(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW PEFT serves, per module, in (out, in) orientation for linears (Conv1D transposed back)
    and (vocab, dim) for embeddings: merge_and_unload() minus the base."""
    from peft import PeftModel

    plain = load_model(base).state_dict()
    merged = PeftModel.from_pretrained(load_model(base), str(adapter)).merge_and_unload().state_dict()
    conv1d = {"c_attn", "c_proj", "c_fc"}
    out = {}
    for k, w in merged.items():
        if k.endswith(".weight") and k in plain and not torch.equal(w, plain[k]):
            d = (w.to(torch.float64) - plain[k].to(torch.float64))
            name = k[: -len(".weight")]
            out[name] = d.T if name.rsplit(".", 1)[-1] in conv1d else d
    return out


def _pattern(patterns: dict, name: str):
    # vllm/lora/peft_helper.py:116-122 (_match_pattern): first key K with (.*\.)?(K)$
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def vllm_delta(adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW as vLLM 0.33 computes it: names parsed as parse_fine_tuned_lora_name does
    (utils.py:130-171), base-embedding weights skipped (lora_model.py:132-133), rank and scale
    from get_rank_and_scaling (peft_helper.py:124-144): ΔW = s·B·A, embeddings looked up by
    column of lora_embedding_A, i.e. (s·B·A)ᵀ."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    t = load_file(adapter / "adapter_model.safetensors")
    r0, a0, rs = cfg["r"], cfg["lora_alpha"], cfg.get("use_rslora", False)
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    out = {}
    for key in t:
        if key.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")):
            continue
        name = key.replace(PREFIX, "") if key.startswith(PREFIX) else key
        parts = name.split(".")
        if parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
            mod, emb = ".".join(parts[:-2]), False
        elif parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
            mod, emb = ".".join(parts[:-1]), True
        else:
            raise AssertionError(f"vLLM rejects {key}")
        if not (parts[-2] == "lora_A" or parts[-1] == "lora_embedding_A"):
            continue
        b = t[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")]
        rank = (_pattern(rp, mod) or r0) if (rp or ap) else r0
        alpha = _pattern(ap, mod) if (rp or ap) else None
        alpha = a0 if alpha is None else alpha
        s = alpha / math.sqrt(rank) if rs else alpha / rank
        d = s * (b.to(torch.float64) @ t[key].to(torch.float64))
        out[mod] = d.T if emb else d
    return out


def lorax_delta(adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW as LoRAX computes it: only base_model.model.<w>.lora_A/B.weight, one scale
    lora_alpha / r (rsLoRA: / sqrt(r)) for every module (adapters/lora.py:37-56, 184-196, 399-407)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    t = load_file(adapter / "adapter_model.safetensors")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    s = alpha / r**0.5 if cfg.get("use_rslora") else alpha / r
    return {k[len(PREFIX): -len(".lora_A.weight")]: s * (t[k.replace("lora_A", "lora_B")].to(torch.float64)
                                                          @ t[k].to(torch.float64))
            for k in t if k.startswith(PREFIX) and k.endswith(".lora_A.weight")}


def sglang_delta(adapter: Path) -> dict[str, torch.Tensor]:
    """SGLang: lora_alpha / r for every module, rsLoRA never read (lora.py LoRAAdapter.__init__)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    return lorax_delta_with(adapter, cfg["lora_alpha"] / cfg["r"])


def lorax_delta_with(adapter: Path, s: float) -> dict[str, torch.Tensor]:
    t = load_file(adapter / "adapter_model.safetensors")
    return {k[len(PREFIX): -len(".lora_A.weight")]: s * (t[k.replace("lora_A", "lora_B")].to(torch.float64)
                                                          @ t[k].to(torch.float64))
            for k in t if k.endswith(".lora_A.weight")}


def assert_same(got: dict, want: dict, rel=1e-5):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for name in want:
        err = float((got[name] - want[name]).norm() / want[name].norm())
        assert err <= rel, (name, err)


def renamed(src: Path, dst: Path, old: str, new: str) -> Path:
    """A copy of the PEFT adapter ``src`` whose tensor names have ``old`` replaced by ``new``
    (what an adapter saved from a wrapper model, or for another architecture, looks like)."""
    dst.mkdir()
    (dst / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    t = load_file(src / "adapter_model.safetensors")
    save_file({k.replace(old, new): v for k, v in t.items()}, dst / "adapter_model.safetensors")
    return dst


# --- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain(llama_dir, tmp_path_factory):
    return make_peft_adapter(llama_dir, tmp_path_factory.mktemp("s") / "plain", seed=2)


@pytest.fixture(scope="module")
def patterns(llama_dir, tmp_path_factory):
    return make_peft_adapter(llama_dir, tmp_path_factory.mktemp("s") / "patterns", seed=3, r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj", "o_proj"],
                             rank_pattern={"q_proj": 8, "layers.1.self_attn.o_proj": 2},
                             alpha_pattern={"v_proj": 32})


@pytest.fixture(scope="module")
def rslora(llama_dir, tmp_path_factory):
    return make_peft_adapter(llama_dir, tmp_path_factory.mktemp("s") / "rslora", seed=4, r=16, lora_alpha=8,
                             use_rslora=True)


# --- check: verdicts -----------------------------------------------------------------------

def test_plain_adapter_loads_and_vllm_applies_what_peft_serves(llama_dir, plain):
    rep = check_json(plain, "--for", "vllm", "--base", llama_dir)
    assert rep["ok"] is True and rep["problems"] == []
    assert rep["max_lora_rank_needed"] == 8 and rep["max_rank"] == 4
    out = run("check", plain, "--for", "vllm").stdout
    assert out.startswith("vLLM 0.33: ok")
    assert_same(vllm_delta(plain), peft_delta(llama_dir, plain))


def test_large_rank_max_lora_rank_needed_and_limit(llama_dir, tmp_path):
    big = make_peft_adapter(llama_dir, tmp_path / "r64", r=64, lora_alpha=16)
    rep = check_json(big)
    assert rep["ok"] is True and rep["max_lora_rank_needed"] == 64
    assert rules(rep, "warning") == {"rank"}  # vLLM's default max_lora_rank is 16
    rep = check_json(big, "--max-lora-rank", "32", code=1)
    assert rules(rep) == {"rank"} and "LoRA rank 64 is greater than max_lora_rank 32" in rep["problems"][0]["message"]
    assert check_json(big, "--max-lora-rank", "64")["ok"] is True
    res = run("check", big, "--max-lora-rank", "48", code=1)  # not a value vLLM accepts
    assert "error: vLLM does not accept max_lora_rank 48" in res.output
    huge = make_peft_adapter(llama_dir, tmp_path / "r600", r=600, lora_alpha=600, target_modules=["q_proj"])
    rep = check_json(huge, code=1)
    assert rep["max_lora_rank_needed"] == 512 and rules(rep) == {"rank"}
    res = run("convert", huge, "--for", "vllm", "--out", tmp_path / "no", code=1)
    assert res.output.startswith("error: cannot convert for vLLM: rank:") and not (tmp_path / "no").exists()


def test_rank_pattern_values_count_and_patterns_scale_like_peft(llama_dir, patterns):
    rep = check_json(patterns, "--base", llama_dir)
    assert rep["ok"] is True and rep["max_rank"] == 8 and rep["max_lora_rank_needed"] == 8
    assert_same(vllm_delta(patterns), peft_delta(llama_dir, patterns))


def test_rslora_scaling(llama_dir, rslora):
    assert check_json(rslora)["ok"] is True
    assert_same(vllm_delta(rslora), peft_delta(llama_dir, rslora))
    rep = check_json(rslora, "--for", "sglang", code=1)
    assert rules(rep) == {"rslora"}


@pytest.mark.parametrize("kwargs, rule", [
    ({"use_dora": True}, "dora"),
    ({"lora_bias": True}, "lora_bias"),
    ({"bias": "lora_only"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
])
def test_refused_features_name_their_rule_and_convert_writes_nothing(llama_dir, tmp_path, kwargs, rule):
    ad = make_peft_adapter(llama_dir, tmp_path / rule, **kwargs)
    rep = check_json(ad, code=1)
    assert rep["ok"] is False and rule in rules(rep, "error")
    res = run("check", ad, code=1)
    assert any(line.startswith(f"error: {rule}: ") for line in res.stdout.splitlines())
    res = run("convert", ad, "--for", "vllm", "--out", tmp_path / "out", code=1)
    assert res.output.startswith(f"error: cannot convert for vLLM: {rule}: ") and res.output.count("\n") == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_classifier_modules_to_save_pass_the_config_but_not_the_tensor_names(plain, tmp_path):
    ad = tmp_path / "score"
    ad.mkdir()
    cfg = json.loads((plain / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["score"]
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    t = load_file(plain / "adapter_model.safetensors")
    t[PREFIX + "score.weight"] = torch.zeros(2, 32)
    save_file(t, ad / "adapter_model.safetensors")
    rep = check_json(ad, code=1)
    assert rules(rep) == {"modules_to_save"} and "unsupported LoRA weight" in rep["problems"][0]["message"]


def test_embedding_lora_and_vocabulary_size(llama_dir, tmp_path):
    ad = make_peft_adapter(llama_dir, tmp_path / "emb", target_modules=["embed_tokens", "q_proj"])
    rep = check_json(ad, "--base", llama_dir)
    assert rep["ok"] is True and rules(rep) == {"skipped_weights"}  # PEFT saved the base embedding too
    assert_same(vllm_delta(ad), peft_delta(llama_dir, ad))
    other = make_llama(tmp_path / "vocab80", vocab=80)
    rep = check_json(ad, "--base", other, code=1)
    assert rules(rep, "error") == {"vocab_size"}
    rep = check_json(ad, "--for", "lorax", code=1)
    assert "embedding" in rules(rep, "error")


def test_gpt2_conv1d_needs_no_transpose(gpt2_dir, tmp_path):
    ad = make_peft_adapter(gpt2_dir, tmp_path / "g2", target_modules=["c_attn", "c_proj"])
    assert json.loads((ad / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    rep = check_json(ad, "--base", gpt2_dir)
    assert rep["ok"] is True and rules(rep) == {"architecture"}  # vLLM's GPT-2 has no SupportsLoRA
    assert_same(vllm_delta(ad), peft_delta(gpt2_dir, ad))
    run("convert", ad, "--for", "vllm", "--out", tmp_path / "out")
    a, b = load_file(ad / "adapter_model.safetensors"), load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # written as is
    assert (tmp_path / "out" / "adapter_config.json").read_bytes() == (ad / "adapter_config.json").read_bytes()


def test_wrong_prefix_loads_but_changes_nothing_and_rewrite_fixes_it(llama_dir, plain, tmp_path):
    ad = renamed(plain, tmp_path / "prefixed", PREFIX + "model.", PREFIX + "language_model.model.")
    assert check_json(ad)["ok"] is True  # without the base nobody can tell
    rep = check_json(ad, "--base", llama_dir, code=1)
    assert rules(rep) == {"module_match"}
    assert "loads but changes nothing for 4 of 4 modules" in rep["problems"][0]["message"]
    assert rep["rewrite_prefix"] == "language_model="  # the shortest rewrite: drop it
    run("convert", ad, "--for", "vllm", "--rewrite-prefix", rep["rewrite_prefix"], "--out", tmp_path / "fixed")
    assert check_json(tmp_path / "fixed", "--base", llama_dir)["ok"] is True
    assert_same(vllm_delta(tmp_path / "fixed"), peft_delta(llama_dir, plain))


def test_unknown_module_names_refuse_the_load(llama_dir, plain, tmp_path):
    ad = renamed(plain, tmp_path / "c_attn", "q_proj", "c_attn")
    rep = check_json(ad, "--base", llama_dir, code=1)
    assert "target_modules" in rules(rep, "error")


# --- convert: ΔW as the server computes it -------------------------------------------------

def test_max_rank_compression_reports_the_svd_error(llama_dir, tmp_path):
    big = make_peft_adapter(llama_dir, tmp_path / "r24", r=24, lora_alpha=12, target_modules=["q_proj", "o_proj"],
                            rank_pattern={"o_proj": 4})
    rep = json.loads(run("convert", big, "--for", "vllm", "--max-rank", "8", "--out", tmp_path / "c",
                         "--json").stdout)
    s = rep["summary"]
    assert s["exact"] is False and s["ranks"] == [4, 8] and s["max_lora_rank_needed"] == 8
    assert check_json(tmp_path / "c", "--max-lora-rank", "8")["ok"] is True
    got, want = vllm_delta(tmp_path / "c"), peft_delta(llama_dir, big)
    assert set(got) == set(want)
    assert_same(peft_delta(llama_dir, tmp_path / "c"), got)  # PEFT reads the written patterns as vLLM does
    num = den = 0.0
    for name, d in want.items():
        sv = torch.linalg.svdvals(d)
        best = float((sv[8:] ** 2).sum().sqrt() / sv.norm())  # Eckart-Young: the best rank-8 error
        err = float((got[name] - d).norm() / d.norm())
        assert err == pytest.approx(best, rel=1e-4, abs=1e-6), name
        if name.endswith("o_proj"):
            assert err < 1e-6  # rank 4 modules are untouched
        num += float((got[name] - d).norm() ** 2)
        den += float(d.norm() ** 2)
    assert s["rel_error"] == pytest.approx((num / den) ** 0.5, rel=1e-4)
    row = next(m for m in rep["modules"] if m["module"].endswith("layers.0.self_attn.q_proj"))
    assert row["from_rank"] == 24 and row["rank"] == 8 and 0 < row["energy_kept"] < 1


def test_lorax_and_sglang_fold_patterns_and_rslora(llama_dir, patterns, rslora, tmp_path):
    rep = check_json(patterns, "--for", "lorax", code=1)
    assert rules(rep, "error") == {"rank_pattern", "alpha_pattern"}  # LoRAX would load it, wrongly
    for src, name in ((patterns, "p"), (rslora, "rs")):
        want = peft_delta(llama_dir, src)
        run("convert", src, "--for", "lorax", "--out", tmp_path / f"lx-{name}")
        assert check_json(tmp_path / f"lx-{name}", "--for", "lorax")["ok"] is True
        assert_same(lorax_delta(tmp_path / f"lx-{name}"), want)
        run("convert", src, "--for", "sglang", "--out", tmp_path / f"sg-{name}")
        assert check_json(tmp_path / f"sg-{name}", "--for", "sglang")["ok"] is True
        assert_same(sglang_delta(tmp_path / f"sg-{name}"), want)
    assert_same(vllm_delta(tmp_path / "lx-p"), peft_delta(llama_dir, patterns))  # still a valid PEFT adapter


def _pissa(llama_dir: Path, tmp_path: Path, init: str):
    """A PiSSA/OLoRA adapter trained (perturbed) in memory, saved as PEFT saves it, the initial
    adapter saved the way PEFT documents it, and the ΔW PEFT serves against the original base."""
    from peft import LoraConfig, get_peft_model

    original = load_model(llama_dir).state_dict()
    model = get_peft_model(load_model(llama_dir), LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                                                             target_modules=["q_proj", "v_proj"]))
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp_path / "init")
    model.peft_config["default"].init_lora_weights = init
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(tmp_path / "trained")
    merged = model.merge_and_unload().state_dict()
    want = {k[:-7]: (merged[k].to(torch.float64) - original[k].to(torch.float64))
            for k in merged if k.endswith(".weight") and ("q_proj" in k or "v_proj" in k)}
    return tmp_path / "trained", tmp_path / "init", want


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_changing_init_converted_exactly(llama_dir, tmp_path, init):
    trained, initial, want = _pissa(llama_dir, tmp_path, init)
    rep = check_json(trained, code=1)
    assert rules(rep) == {"init_lora_weights"}
    res = run("convert", trained, "--for", "vllm", "--out", tmp_path / "no", code=1)
    assert "init_lora_weights" in res.output and "--base" in res.output and not (tmp_path / "no").exists()
    for via, base in (("base", llama_dir), ("initial", initial)):
        out = tmp_path / f"conv-{via}"
        run("convert", trained, "--for", "vllm", "--base", base, "--out", out)
        rep = check_json(out)
        assert rep["ok"] is True and rep["max_rank"] == 8
        assert_same(vllm_delta(out), want)


def test_initial_adapter_conversion_matches_peft_save_pretrained(llama_dir, tmp_path):
    """Our --base <initial adapter> writes the very tensors PEFT's own conversion writes."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(llama_dir), LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa",
                                                             target_modules=["q_proj"]))
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp_path / "init")
    model.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(1.5)
    model.save_pretrained(tmp_path / "trained")
    model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    run("convert", tmp_path / "trained", "--for", "vllm", "--base", tmp_path / "init", "--out", tmp_path / "ours")
    a = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)
    ca = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    cb = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (ca["r"], ca["lora_alpha"], ca["init_lora_weights"]) == (cb["r"], cb["lora_alpha"], cb["init_lora_weights"])


def test_convert_output_is_atomic_with_provenance(plain, tmp_path):
    out = tmp_path / "o"
    run("convert", plain, "--for", "vllm", "--out", out)
    from adapterhub_local import provenance

    prov = provenance.read(out)
    assert prov["written_by"] == "convert" and prov["method"] == "convert"
    assert prov["extra"]["target"] == "vLLM 0.33" and prov["lineage"]["parents"] == [str(plain.resolve())]
    res = run("convert", plain, "--for", "vllm", "--out", plain / "inside", code=1)
    assert "is inside the input" in res.output and not (plain / "inside").exists()
    res = run("convert", plain, "--for", "vllm", "--out", out, code=1)
    assert "already exists" in res.output


# --- read-only, hostile input, the card line -----------------------------------------------

def test_check_never_imports_torch(plain, llama_dir):
    code = f"""
import sys
from adapterhub_local.cli import main
for args in (["check", {str(plain)!r}, "--json"], ["check", {str(plain)!r}, "--base", {str(llama_dir)!r}],
             ["check", {str(plain)!r}, "--for", "lorax"]):
    try:
        main(args)
    except SystemExit as e:
        assert not e.code, e.code
heavy = sorted(m for m in ("torch", "transformers", "safetensors", "peft", "huggingface_hub") if m in sys.modules)
assert heavy == [], heavy
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "ADAPTERS_PROGRESS": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_hostile_config_and_names_are_one_line(tmp_path, plain):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("[1, 2]")
    res = run("check", bad, code=1)
    assert res.output.startswith("error: ") and res.output.count("\n") == 1
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "adapter_config.json").write_bytes((plain / "adapter_config.json").read_bytes())
    t = load_file(plain / "adapter_model.safetensors")
    t[PREFIX + "x\x1b[31m.weird"] = torch.zeros(1)
    save_file(t, odd / "adapter_model.safetensors")
    res = run("check", odd, code=1)
    assert "\x1b" not in res.output and "tensor_name" in res.output


def test_serving_summary_for_the_card(llama_dir, plain, tmp_path):
    from adapterhub_local.serve import serving_summary

    big = make_peft_adapter(llama_dir, tmp_path / "r32", r=32, lora_alpha=32)
    assert serving_summary(big).startswith("Serving: vLLM ≥ 0.33 loads this adapter with max_lora_rank ≥ 32")
    dora = make_peft_adapter(llama_dir, tmp_path / "dora", use_dora=True)
    assert serving_summary(dora).startswith("Serving: vLLM 0.33 will not serve this adapter") and "dora" in \
        serving_summary(dora)
    assert serving_summary(tmp_path / "missing").startswith("Serving: not checked")


def test_registry_ref_and_its_known_base(llama_dir, plain, tmp_path):
    """A registered version is checked by REF, against the base the registry recorded for it."""
    ad = renamed(plain, tmp_path / "prefixed", PREFIX + "model.", PREFIX + "wrapper.model.")
    run("register", plain, "--name", "good", "--base", llama_dir)
    run("register", ad, "--name", "wrapped", "--base-fingerprint", json.loads(
        run("fingerprint", llama_dir, "--json").stdout)["fingerprint"])
    rep = check_json("good")
    assert rep["ok"] is True and rep["base"] == str(llama_dir)
    rep = check_json("wrapped", code=1)
    assert rules(rep) == {"module_match"} and rep["rewrite_prefix"] == "wrapper="
    res = run("check", "nosuch", code=1)
    assert res.output.startswith("error: no adapter matches 'nosuch'")


def test_push_card_carries_the_vllm_verdict(llama_dir, plain, tmp_path):
    """`adapters push` writes the check's verdict into the card; it never fails because of it."""
    big = make_peft_adapter(llama_dir, tmp_path / "r32", r=32, lora_alpha=32)
    run("push", big, "me/big", "--dry-run", "--dry-run-dir", tmp_path / "staged")
    card = (tmp_path / "staged" / "README.md").read_text()
    assert "Serving: vLLM ≥ 0.33 loads this adapter with max_lora_rank ≥ 32" in card
    huge = make_peft_adapter(llama_dir, tmp_path / "r600", r=600, lora_alpha=600, target_modules=["q_proj"])
    run("push", huge, "me/huge", "--dry-run", "--dry-run-dir", tmp_path / "staged2")
    card = (tmp_path / "staged2" / "README.md").read_text()
    assert "Serving: vLLM 0.33 will not serve this adapter as PEFT does: rank: LoRA rank 600" in card
