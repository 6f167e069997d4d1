"""Adapter algebra (cat, linear, svd, ties, dare, magnitude_prune), interpolate and stack."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import logits, make_gpt2, make_peft_adapter, peft_logits

from adapterhub_local.cli import cli, main
from adapterhub_local.errors import UnknownMergeMethod
from adapterhub_local.lora import LoraModule
from adapterhub_local.merge import resolve_inputs
from adapterhub_local.merge.algebra import combine
from adapterhub_local.merge.base import merge_into_base
from adapterhub_local.merge.inputs import MergeInput
from adapterhub_local.merge.methods import METHODS, get_method, magnitude_prune, ties_combine
from adapterhub_local.peft_format import LoraAdapter, load_adapter, lora_config


def deltas(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """{module: s·B·A} in float64, B@A orientation, independent of the merge code's math."""
    return {n: (m.B.double() @ m.A.double()) * m.scale for n, m in adapter.to_torch().modules.items()}


def weighted_sum(items) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for adapter, w in items:
        for n, d in deltas(adapter).items():
            out[n] = out.get(n, 0) + w * d
    return out


def assert_same_deltas(a: dict, b: dict, tol=1e-5):
    keys = set(a) | set(b)
    for k in keys:
        x = a.get(k, torch.zeros_like(b.get(k, torch.zeros(1))))
        y = b.get(k, torch.zeros_like(x))
        torch.testing.assert_close(x.double(), y.double(), rtol=tol, atol=tol, msg=k)


@pytest.fixture(scope="module")
def trio(llama_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("trio")
    a = make_peft_adapter(llama_dir, d / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b = make_peft_adapter(llama_dir, d / "b", seed=2, r=8, lora_alpha=4, use_rslora=True,
                          target_modules=["q_proj", "o_proj", "up_proj"])
    c = make_peft_adapter(llama_dir, d / "c", seed=3, r=2, lora_alpha=16, rank_pattern={"v_proj": 6},
                          alpha_pattern={"layers.1.self_attn.v_proj": 3}, target_modules=["v_proj", "down_proj"])
    return a, b, c


def test_cat_is_exact_and_loads_in_peft_with_same_logits(llama_dir, trio, tmp_path):
    a, b, c = trio
    out = tmp_path / "cat"
    res = CliRunner().invoke(cli, ["merge", str(a), str(b), str(c), "--into-adapter", "--method", "cat",
                                   "--weights", "0.5,1.5,-1", "--out", str(out), "--json"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["summary"]["exact"] and report["summary"]["rel_error"] == 0
    ad = load_adapter(out)
    srcs = [load_adapter(p) for p in (a, b, c)]
    assert_same_deltas(deltas(ad), weighted_sum(zip(srcs, [0.5, 1.5, -1])))
    assert ad.modules["model.layers.0.self_attn.q_proj"].rank == 4 + 8  # Σ r over adapters that have it
    assert ad.modules["model.layers.0.self_attn.v_proj"].rank == 4 + 6
    # PEFT loads it, and its logits equal our streaming merge of the three into the base
    merged = tmp_path / "merged"
    merge_into_base(llama_dir, resolve_inputs([str(a), str(b), str(c)], [0.5, 1.5, -1]), merged, progress=False)
    torch.testing.assert_close(peft_logits(llama_dir, out), logits(merged), rtol=1e-4, atol=1e-5)
    for name in ("recipe.yaml", "README.md", "adapterhub.json"):
        assert (out / name).is_file()


def test_linear_is_exact_via_cat_and_via_svd_at_full_rank(trio, tmp_path):
    a, b, _ = trio
    inputs = resolve_inputs([str(a), str(b)], [0.3, 0.7])
    exact = weighted_sum([(i.adapter, i.weight) for i in inputs])
    cat_ad, rep = combine(inputs, "linear")
    assert rep.summary["via"] == "cat" and rep.summary["exact"]
    assert_same_deltas(deltas(cat_ad), exact)
    svd_ad, rep = combine(inputs, "linear", rank=12)
    assert rep.summary["via"] == "svd" and rep.summary["rel_error"] < 1e-6
    assert_same_deltas(deltas(svd_ad), exact)


def test_svd_truncation_reports_true_error_and_energy(trio):
    a, b, c = trio
    inputs = resolve_inputs([str(a), str(b), str(c)], [1.0, 1.0, 1.0])
    exact = weighted_sum([(i.adapter, i.weight) for i in inputs])
    ad, rep = combine(inputs, "svd", rank=3)
    got = deltas(ad)
    num = sum(float(((exact[k] - got.get(k, 0)) ** 2).sum()) for k in exact)
    den = sum(float((exact[k] ** 2).sum()) for k in exact)
    assert rep.summary["rel_error"] == pytest.approx((num / den) ** 0.5, rel=1e-4)
    assert 0 < rep.summary["rel_error"] < 1
    for row in rep.modules:
        e = exact[row["module"]]
        s = torch.linalg.svdvals(e)
        assert row["energy_kept"] == pytest.approx(float((s[:3] ** 2).sum() / (s**2).sum()), rel=1e-4)
        assert row["rank"] <= 3


def _ref_ties(ds, ws, density):
    """TIES written out element by element, independent of methods.py's vectorised code."""
    flat = [d.reshape(-1).tolist() for d in ds]
    n = len(flat[0])
    kept = []
    for f in flat:
        k = round(density * n)
        order = sorted(range(n), key=lambda i: -abs(f[i]))[:k]
        keep = set(order)
        kept.append([f[i] if i in keep else 0.0 for i in range(n)])
    out = []
    for i in range(n):
        total = sum(w * kv[i] for kv, w in zip(kept, ws))
        sign = (total > 0) - (total < 0)
        num = den = 0.0
        for kv, w in zip(kept, ws):
            v = w * kv[i]
            if v != 0 and ((v > 0) - (v < 0)) == sign:
                num += v
                den += abs(w)
        out.append(num / den if den else 0.0)
    return torch.tensor(out, dtype=torch.float64).reshape(ds[0].shape)


def test_ties_matches_reference_implementation():
    g = torch.Generator().manual_seed(0)
    ds = [torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    ws = [0.6, 1.0, -0.4]
    got = ties_combine([magnitude_prune(d, 0.4) for d in ds], ws)
    torch.testing.assert_close(got, _ref_ties(ds, ws, 0.4))


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_dense_methods_report_true_error_and_are_seeded(trio, method, tmp_path):
    a, b, _ = trio
    args = ["merge", str(a), str(b), "--into-adapter", "--method", method, "--density", "0.6", "--rank", "4",
            "--seed", "7", "--json"]
    r1 = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "x")], catch_exceptions=False)
    r2 = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "y")], catch_exceptions=False)
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output
    for name in ("adapter_model.safetensors", "adapter_config.json", "recipe.yaml"):
        assert (tmp_path / "x" / name).read_bytes() == (tmp_path / "y" / name).read_bytes()
    rep = json.loads(r1.stdout)
    assert rep["summary"]["seed"] == (7 if method.startswith("dare") else None)
    inputs = resolve_inputs([str(a), str(b)])
    exact = weighted_sum([(i.adapter, 1.0) for i in inputs])
    got = deltas(load_adapter(tmp_path / "x"))
    num = sum(float(((exact[k] - got.get(k, 0)) ** 2).sum()) for k in exact)
    den = sum(float((exact[k] ** 2).sum()) for k in exact)
    assert rep["summary"]["rel_error"] == pytest.approx((num / den) ** 0.5, rel=1e-3)
    assert rep["summary"]["rel_error"] > 0.01  # pruning really changed something
    if method.startswith("dare"):
        r3 = CliRunner().invoke(cli, args[:-3] + ["--seed", "8", "--out", str(tmp_path / "z")],
                                catch_exceptions=False)
        assert r3.exit_code == 0
        assert (tmp_path / "x" / "adapter_model.safetensors").read_bytes() != \
            (tmp_path / "z" / "adapter_model.safetensors").read_bytes()
    replay = CliRunner().invoke(cli, ["merge", "--recipe", str(tmp_path / "x" / "recipe.yaml"),
                                      "--out", str(tmp_path / "r")], catch_exceptions=False)
    assert replay.exit_code == 0, replay.output
    for p in (tmp_path / "x").iterdir():
        assert p.read_bytes() == (tmp_path / "r" / p.name).read_bytes(), p.name


def test_union_of_targets_and_gpt2_cat_loads_in_peft(tmp_path):
    base = make_gpt2(tmp_path / "g")
    a = make_peft_adapter(base, tmp_path / "a", target_modules=["c_attn"], fan_in_fan_out=True)
    b = make_peft_adapter(base, tmp_path / "b", seed=4, r=2, target_modules=["c_fc"], fan_in_fan_out=True,
                          lora_bias=True)
    out = tmp_path / "ab"
    CliRunner().invoke(cli, ["stack", str(a), str(b), "--out", str(out)], catch_exceptions=False)
    ad = load_adapter(out)
    assert {n.rsplit(".", 1)[-1] for n in ad.modules} == {"c_attn", "c_fc"}
    assert ad.config["fan_in_fan_out"] and ad.config["lora_bias"]
    merged = tmp_path / "m"
    merge_into_base(base, resolve_inputs([str(a), str(b)]), merged, progress=False)
    torch.testing.assert_close(peft_logits(base, out), logits(merged), rtol=1e-4, atol=1e-5)


def test_interpolate_cli_exact_and_endpoints(trio, tmp_path):
    a, b, _ = trio
    res = CliRunner().invoke(cli, ["interpolate", str(a), str(b), "--t", "0.3", "--out", str(tmp_path / "i"),
                                   "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["operation"] == "interpolate" and rep["summary"]["exact"]
    la, lb = load_adapter(a), load_adapter(b)
    assert_same_deltas(deltas(load_adapter(tmp_path / "i")), weighted_sum([(la, 0.7), (lb, 0.3)]))
    CliRunner().invoke(cli, ["interpolate", str(a), str(b), "--t", "0", "--out", str(tmp_path / "i0")],
                       catch_exceptions=False)
    assert_same_deltas(deltas(load_adapter(tmp_path / "i0")), deltas(la))
    res = CliRunner().invoke(cli, ["interpolate", str(a), str(b), "--t", "0.5", "--rank", "2",
                                   "--out", str(tmp_path / "i2"), "--json"], catch_exceptions=False)
    assert json.loads(res.stdout)["summary"]["via"] == "svd"
    assert load_adapter(tmp_path / "i2").ranks == [2]
    res = CliRunner().invoke(cli, ["merge", "--recipe", str(tmp_path / "i2" / "recipe.yaml"), "--out",
                                   str(tmp_path / "i2-again"), "--json"], catch_exceptions=False)
    assert json.loads(res.stdout)["operation"] == "interpolate"
    for p in (tmp_path / "i2").iterdir():
        assert p.read_bytes() == (tmp_path / "i2-again" / p.name).read_bytes(), p.name


def test_unknown_method_and_bad_args_are_clean_errors(trio, tmp_path, capsys):
    a, b, _ = trio
    with pytest.raises(SystemExit) as e:
        main(["merge", str(a), str(b), "--into-adapter", "--method", "average", "--out", str(tmp_path / "o")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "unknown merge method 'average'" in err and "ties" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        main(["merge", str(a), str(b), "--into-adapter", "--weights", "1,2,3", "--out", str(tmp_path / "o")])
    assert e.value.code == 1
    with pytest.raises(SystemExit) as e:
        main(["merge", str(a), str(b), "--into-adapter", "--method", "cat", "--rank", "2", "--out",
              str(tmp_path / "o")])
    assert e.value.code == 1
    assert not (tmp_path / "o").exists()
    with pytest.raises(UnknownMergeMethod):
        get_method("nope")


def test_methods_registry_is_explicit():
    assert set(METHODS) == {"cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"}
    from adapterhub_local.merge.methods import Method, register

    with pytest.raises(ValueError):
        register(Method("cat", False, (), None, "dup"))


def test_different_bases_refused(trio, tmp_path, capsys):
    import shutil

    a, b, _ = trio
    for src, name, fp in ((a, "a", "sha256:" + "1" * 64), (b, "b", "sha256:" + "2" * 64)):
        shutil.copytree(src, tmp_path / name)
        (tmp_path / name / "adapterhub.json").write_text(json.dumps({"base_fingerprint": fp}))
    with pytest.raises(SystemExit) as e:
        main(["stack", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o")])
    assert e.value.code == 1
    assert "different base models" in capsys.readouterr().err


# ---- hypothesis properties, on small in-memory adapters ------------------------------------------

SHAPES = {"l0.q": (6, 5), "l0.v": (4, 6), "l1.q": (6, 5)}


def random_adapter(seed: int, ranks: dict[str, int], rslora: bool) -> MergeInput:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name, r in ranks.items():
        out_f, in_f = SHAPES[name]
        alpha = float(1 + seed % 5)
        scale = alpha / (r**0.5) if rslora else alpha / r
        mods[name] = LoraModule(name, torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g),
                                scale, r=r, alpha=alpha)
    ad = LoraAdapter(config=lora_config(r=max(ranks.values()), use_rslora=rslora), modules=mods)
    return MergeInput(ref=f"mem{seed}", folder=Path("."), adapter=ad)


adapters_st = st.builds(
    random_adapter, st.integers(0, 10_000),
    st.dictionaries(st.sampled_from(sorted(SHAPES)), st.integers(1, 4), min_size=1),
    st.booleans(),
)
weights_st = st.floats(-2, 2, allow_nan=False).filter(lambda w: abs(w) > 1e-3)


def as_input(adapter: LoraAdapter, ref: str, weight: float = 1.0) -> MergeInput:
    return MergeInput(ref=ref, folder=Path("."), adapter=adapter, weight=weight)


@settings(max_examples=25, deadline=None)
@given(adapters_st, adapters_st, adapters_st)
def test_stacking_is_associative(a, b, c):
    ab, _ = combine([a, b], "cat", notify=None)
    bc, _ = combine([b, c], "cat", notify=None)
    left, _ = combine([as_input(ab, "ab"), c], "cat", notify=None)
    right, _ = combine([a, as_input(bc, "bc")], "cat", notify=None)
    flat, _ = combine([a, b, c], "cat", notify=None)
    assert_same_deltas(deltas(left), deltas(flat))
    assert_same_deltas(deltas(right), deltas(flat))
    assert_same_deltas(deltas(flat), weighted_sum([(x.adapter, 1.0) for x in (a, b, c)]))


@settings(max_examples=25, deadline=None)
@given(adapters_st, adapters_st, st.sampled_from([None, 64]))
def test_interpolation_endpoints(a, b, rank):
    for t, want in ((0.0, a), (1.0, b)):
        a.weight, b.weight = 1 - t, t
        got, _ = combine([a, b], "linear", rank=rank, notify=None)
        assert_same_deltas(deltas(got), deltas(want.adapter))


@settings(max_examples=25, deadline=None)
@given(adapters_st, adapters_st, weights_st, st.sampled_from(["cat", "linear", "ties", "dare_linear",
                                                              "magnitude_prune"]))
def test_weight_zero_is_a_no_op(a, b, w, method):
    a.weight, b.weight = w, 0.0
    kw = {"rank": 64} if METHODS[method].dense else {}
    with_b, _ = combine([a, b], method, notify=None, **kw)
    alone, _ = combine([a], method, notify=None, **kw)
    assert_same_deltas(deltas(with_b), deltas(alone))
