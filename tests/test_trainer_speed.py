"""The trainer's speed work changes no math: fused loss blocks, oneDNN Linears, the allocator."""

from __future__ import annotations

import resource

import pytest
import torch
from adapterhub_local.trainer import speed
from adapterhub_local.trainer.loss import _LinearCrossEntropy
from adapterhub_local.trainer.speed import (
    OneDNNLinear,
    restore_linears,
    tuned_allocator,
    use_onednn,
)
from torch import nn

needs_onednn = pytest.mark.skipif(speed._onednn_op() is None, reason="this torch has no oneDNN")


def _reference(h, w, t):
    logits = h @ w.T
    return nn.functional.cross_entropy(logits.double(), t, reduction="sum")


@pytest.mark.parametrize("rows,block,dnnl", [(1000, 1000, False), (7, 3, False), (5, 1, False),
                                             (16, 16, False), (7, 3, True), (1000, 1000, True)])
def test_linear_cross_entropy_equals_cross_entropy(rows, block, dnnl):
    if dnnl and speed._onednn_op() is None:
        pytest.skip("this torch has no oneDNN")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 24, generator=g, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(50, 24, generator=g)
    t = torch.randint(0, 50, (37,), generator=g)
    loss = _LinearCrossEntropy.apply(h, w, t, rows, block, w.t().contiguous() if dnnl else None)
    (grad,) = torch.autograd.grad(loss * 0.5, h)
    hd = h.detach().double().requires_grad_()
    ref = _reference(hd, w.double(), t)
    (ref_grad,) = torch.autograd.grad(ref * 0.5, hd)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dnnl", [False, True])
def test_linear_cross_entropy_no_rows(dnnl):
    # a DDP rank's empty slice of a short last micro-batch: zero loss, zero gradient
    w = torch.randn(50, 24)
    h = torch.zeros(0, 24, requires_grad=True)
    loss = _LinearCrossEntropy.apply(h, w, torch.zeros(0, dtype=torch.long), 8, 4,
                                     w.t().contiguous() if dnnl else None)
    assert float(loss.detach()) == 0.0
    (grad,) = torch.autograd.grad(loss, h)
    assert grad.shape == (0, 24)


def test_linear_cross_entropy_confidently_wrong_rows_stay_finite():
    # target probability far below float32's smallest normal: softmax underflows to 0 there,
    # and the loss must come from the logits themselves (as cross_entropy's does), not inf
    g = torch.Generator().manual_seed(1)
    h = torch.randn(9, 8, generator=g)
    w = torch.randn(30, 8, generator=g) * 40
    t = (h @ w.T).argmin(1)  # the least likely token, ~1e-100 and beyond
    t[0] = (h[0] @ w.T).argmax()  # and one easy row
    loss = _LinearCrossEntropy.apply(h.requires_grad_(), w, t, 4, 2)
    ref = _reference(h.detach().double(), w.double(), t)
    assert torch.isfinite(loss) and float(ref) > 9 * 87  # past exp's float32 range
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-3)
    (grad,) = torch.autograd.grad(loss, h)
    assert torch.isfinite(grad).all()


def _net(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 20, bias=bias), nn.SiLU(), nn.Linear(20, 6, bias=False))


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_linear_forward_and_input_grad(bias):
    net = _net(bias).requires_grad_(False)
    plain = _net(bias).requires_grad_(False)
    x = torch.randn(3, 5, 12, requires_grad=True)
    gy = torch.randn(3, 5, 6)
    y0 = plain(x)
    (gx0,) = torch.autograd.grad(y0, x, gy)
    keys = list(net.state_dict())
    assert use_onednn(net) == 2
    assert all(type(m) is OneDNNLinear for m in (net[0], net[2]))
    assert list(net.state_dict()) == keys  # names and parameters untouched
    y1 = net(x)
    (gx1,) = torch.autograd.grad(y1, x, gy)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        xs = x.transpose(0, 1)  # strided input
        torch.testing.assert_close(net(xs), plain(xs), rtol=1e-5, atol=1e-6)
    restore_linears(net)
    assert type(net[0]) is nn.Linear


@needs_onednn
def test_onednn_leaves_trainable_lm_head_skip_and_other_dtypes_alone():
    net = _net()
    net[0].requires_grad_(False)  # net[2] trainable: must keep its weight gradient
    head = nn.Linear(6, 4).requires_grad_(False)
    model = nn.Sequential(net, head, nn.Linear(4, 4).to(torch.float64).requires_grad_(False))
    assert use_onednn(model, skip=[head]) == 1
    assert type(net[0]) is OneDNNLinear and type(net[2]) is nn.Linear and type(head) is nn.Linear
    # under autocast (bf16) and for non-float32 inputs it is nn.Linear.forward
    x = torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net[0](x).dtype == torch.bfloat16
    assert net[0](x.double().float()).dtype == torch.float32
    assert net[0].weight.grad is None


def test_tuned_allocator_keeps_large_blocks_then_restores():
    def faults_of_big_alloc():
        t = torch.empty(16 * 1024 * 1024)  # 64 MB: mmap'd by default glibc settings
        t.fill_(1.0)
        del t
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(16 * 1024 * 1024)
        t.fill_(1.0)
        del t
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    with tuned_allocator() as ok:
        if not ok:
            pytest.skip("not glibc")
        inside = faults_of_big_alloc()
    after = faults_of_big_alloc()
    pages = 64 * 1024 * 1024 // resource.getpagesize()
    assert inside < pages // 10  # the second 64 MB block reused the heap: no fresh pages
    assert after > pages // 2  # defaults back: mmap'd (and faulted in) afresh


def test_tuned_allocator_disabled_is_a_no_op():
    with tuned_allocator(False) as ok:
        assert ok is False


# --- bf16: frozen weights cast once ----------------------------------------------------


def _tiny(tmp_path, arch="llama"):
    from tiny import load_model, make_gpt2, make_llama

    path = (make_llama if arch == "llama" else make_gpt2)(tmp_path / arch)
    return load_model(path)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_cast_once_is_what_autocast_computes(tmp_path, arch):
    from adapterhub_local.trainer.lora_layers import inject_lora
    from adapterhub_local.trainer.loss import CausalLMLoss
    from adapterhub_local.trainer.speed import cast_frozen_matmul_weights
    from tiny import input_ids

    targets = ["q_proj", "v_proj"] if arch == "llama" else ["c_attn"]
    runs = []
    for cast in (False, True):
        model = _tiny(tmp_path / str(cast), arch)
        torch.manual_seed(0)
        layers = inject_lora(model, targets, r=4, alpha=8)
        with torch.no_grad():
            for layer in layers.values():
                layer.lora_B.weight.normal_()
        if cast:
            assert cast_frozen_matmul_weights(model, torch.bfloat16) > 0
            head, emb = model.get_output_embeddings(), model.get_input_embeddings()
            tied = head.weight is emb.weight
            assert head.weight.dtype == (torch.float32 if tied else torch.bfloat16)
            assert arch == "llama" or tied  # GPT-2 ties its head: the embedding stays float32
            assert emb.weight.dtype == torch.float32
            assert all(p.dtype == torch.float32 for l in layers.values() for p in l.lora_parameters())
        ids = input_ids(batch=2, length=10)
        fn = CausalLMLoss(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(ids, ids.clone())
            logits = model(ids).logits
            with torch.no_grad():  # the plain path: bf16 logits, float32 cross-entropy
                plain = CausalLMLoss(model, fused=False)(ids, ids.clone())
        torch.testing.assert_close(loss.detach(), plain, rtol=1e-5, atol=1e-4)
        loss.backward()
        grads = [p.grad for l in layers.values() for p in l.lora_parameters()]
        runs.append((loss.detach(), logits.detach(), grads))
    (l0, z0, g0), (l1, z1, g1) = runs
    assert torch.equal(z0, z1) and torch.equal(l0, l1)  # the same bf16 values, bit for bit
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)


# --- the trainer with and without oneDNN ----------------------------------------------------


@needs_onednn
def test_training_with_and_without_onednn_agrees(tmp_path, monkeypatch):
    import json

    from adapterhub_local.trainer import loop
    from click.testing import CliRunner
    from test_train import make_base, write_jsonl
    from tiny import load_model

    from adapterhub_local.cli import cli
    from adapterhub_local.peft_format import load_adapter

    base = make_base(tmp_path / "base")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat sat on the mat " * (1 + i % 3)}
                                              for i in range(24)])
    seen = []
    real = loop.use_onednn

    def spy(model, skip=()):
        n = real(model, skip)
        seen.append(n)
        return n

    monkeypatch.setattr(loop, "use_onednn", spy)
    runs = {}
    for flag in ("--onednn", "--no-onednn"):
        res = CliRunner().invoke(cli, [
            "train", str(base), "--data", str(data), "--out", str(tmp_path / flag), "--no-register",
            "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--max-steps", "4", "--batch-size", "4",
            "--grad-accum", "1", "--dropout", "0.1", "--targets", "all-linear", "--json", flag,
        ], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        log = (tmp_path / flag / "metrics.jsonl").read_text().splitlines()
        runs[flag] = ([json.loads(x)["loss"] for x in log], load_adapter(tmp_path / flag).to_torch().tensors())
    n_linear = sum(type(m) is nn.Linear for m in load_model(base).modules())
    assert seen == [n_linear - 1]  # every frozen Linear but the head (the loss uses its weight)
    (l1, t1), (l0, t0) = runs["--onednn"], runs["--no-onednn"]
    assert l1 == pytest.approx(l0, rel=1e-5)  # same math: float32 rounding apart
    for k in t0:
        torch.testing.assert_close(t1[k], t0[k], rtol=1e-3, atol=1e-5)
