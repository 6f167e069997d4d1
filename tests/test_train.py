"""The trainer: LoRA layers vs PEFT, data formats and masking, the loop, resume, registry."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from adapterhub_local.trainer import TrainConfig, train
from adapterhub_local.trainer import data as D
from adapterhub_local.trainer.loop import get_lr
from adapterhub_local.trainer.lora_layers import (
    adapter_applied,
    apply_adapter,
    extract_adapter,
    inject_lora,
    lora_layers,
)
from adapterhub_local.trainer.loss import CausalLMLoss
from tiny import input_ids, load_model, make_gpt2, make_peft_adapter, make_tokenizer

from adapterhub_local.peft_format import WEIGHTS_NAME, load_adapter, save_adapter

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "red", "big"]
SENTENCES = ["the cat sat on the mat", "a dog ran far away", "the red big dog sat"]


def _texts(n=120, seed=0):
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14))) for _ in range(n)]


def make_base(out: Path, arch: str = "llama", init: float = 0.2) -> Path:
    """A tiny causal LM with a tokenizer; init 0.2 so a frozen lm_head can express confident
    predictions (at 0.02 the logits cannot move far enough for loss to fall)."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=init)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif arch == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=None))
    elif arch == "gpt2":
        make_gpt2(out)
        model = None
    else:
        raise ValueError(arch)
    if model is not None:
        model.save_pretrained(out)
    make_tokenizer(out, SENTENCES + _texts())
    return Path(out)


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return path


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("trainbase") / "llama")


@pytest.fixture(scope="session")
def gpt2_base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("trainbase") / "gpt2", "gpt2")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    texts = _texts(96)
    write_jsonl(d / "text.jsonl", [{"text": t} for t in texts])
    write_jsonl(d / "eval.jsonl", [{"text": t} for t in _texts(16, seed=1)])
    write_jsonl(d / "learn.jsonl", [{"text": s} for s in SENTENCES * 20])
    write_jsonl(d / "pc.jsonl", [{"prompt": t[:9], "completion": t[9:] + " done"} for t in texts[:40]])
    return d


def cfg(base, data, out, **kw):
    kw.setdefault("register", False)
    kw.setdefault("max_steps", 4)
    kw.setdefault("batch_size", 4)
    kw.setdefault("grad_accum", 2)
    kw.setdefault("rank", 4)
    kw.setdefault("alpha", 8)
    kw.setdefault("lr", 1e-2)
    return TrainConfig(base=base, data=data, out=out, **kw)


def _bytes(folder: Path) -> bytes:
    return (Path(folder) / WEIGHTS_NAME).read_bytes()


# --- LoRA layers against PEFT ---------------------------------------------------------


def test_init_is_peft_init(base):
    from peft import LoraConfig, get_peft_model

    ours = load_model(base)
    torch.manual_seed(3)
    inject_lora(ours, ["q_proj", "v_proj"], r=4, alpha=8)
    theirs = load_model(base)
    torch.manual_seed(3)
    peft = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    sd = peft.state_dict()
    for name, layer in lora_layers(ours).items():
        a, b = layer.factors
        assert torch.equal(a, sd[f"base_model.model.{name}.lora_A.default.weight"])
        assert torch.equal(b, torch.zeros_like(b))
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)


def _randomize(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in layer.lora_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("arch,targets,extra", [
    ("llama", ["q_proj", "v_proj"], {}),
    ("llama", ["all-linear"], {"use_rslora": True}),
    ("llama", ["embed_tokens", "o_proj"], {}),
    ("gpt2", ["all-linear"], {}),
    ("qwen2", ["q_proj", "k_proj", "down_proj"], {}),
    ("mistral", ["all-linear"], {}),
])
def test_saved_adapter_loads_in_peft_with_equal_logits(tmp_path, base, gpt2_base, arch, targets, extra):
    from peft import PeftModel

    folder = {"llama": base, "gpt2": gpt2_base}.get(arch) or make_base(tmp_path / arch, arch)
    model = load_model(folder)
    inject_lora(model, targets, r=4, alpha=8, use_rslora=extra.get("use_rslora", False))
    _randomize(model)
    adapter = extract_adapter(model, base_model_name_or_path=str(folder))
    save_adapter(adapter, tmp_path / "ad")
    ids = input_ids(vocab=64, batch=2, length=10)
    with torch.no_grad():
        ours = model(ids).logits
        peft = PeftModel.from_pretrained(load_model(folder), tmp_path / "ad").eval()
        theirs = peft(ids).logits
        plain = load_model(folder)(ids).logits
    assert not torch.allclose(ours, plain, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    if arch == "gpt2":
        assert adapter.config["fan_in_fan_out"] is True


def test_apply_adapter_matches_peft_and_context_restores(tmp_path, base):
    from peft import PeftModel

    ad_dir = make_peft_adapter(base, tmp_path / "ad", r=4, lora_alpha=16,
                               target_modules=["q_proj", "v_proj", "up_proj"],
                               rank_pattern={"up_proj": 2}, alpha_pattern={"up_proj": 3})
    ids = input_ids(vocab=64)
    model = load_model(base)
    with torch.no_grad():
        plain = model(ids).logits
        theirs = PeftModel.from_pretrained(load_model(base), ad_dir).eval()(ids).logits
        with adapter_applied(model, load_adapter(ad_dir)):
            ours = model(ids).logits
        after = model(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, plain)
    assert not lora_layers(model)


def test_apply_adapter_rejects_wrong_base(tmp_path, base, gpt2_base):
    from adapterhub_local.errors import AdapterHubError

    ad_dir = make_peft_adapter(base, tmp_path / "ad")
    with pytest.raises(AdapterHubError, match="does not exist|shape"):
        apply_adapter(load_model(gpt2_base), load_adapter(ad_dir))


def test_fused_loss_equals_plain_cross_entropy(base):
    model = load_model(base)
    inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    _randomize(model)
    ids = input_ids(vocab=64, batch=3, length=12)
    labels = ids.clone()
    labels[0, :5] = -100
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    labels[2, 9:] = -100
    results = []
    for fused in (True, False):
        fn = CausalLMLoss(model, fused=fused, chunk_elems=64 * 7, block_elems=64 * 3)  # several chunks, blocks
        assert fn.fused == fused
        for p in model.parameters():
            p.grad = None
        loss = fn(ids, labels, mask)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-6)
    for g1, g2 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)
    # and it is the transformers loss (a token mean) times the number of loss tokens
    ref = model(ids, attention_mask=mask, labels=labels).loss * int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(results[0][0], ref.detach(), atol=1e-4, rtol=1e-5)


# --- data ------------------------------------------------------------------------------


def test_completion_only_masks_exactly_the_prompt(tmp_path, base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    rows = [{"prompt": "the cat sat", "completion": " on the mat"}, {"text": "a dog ran"}]
    exs, stats = D.load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tok, 64)
    p_ids = tok("the cat sat").input_ids
    c_ids = tok(" on the mat", add_special_tokens=False).input_ids
    pc = exs[0]
    assert pc.ids == p_ids + c_ids + [tok.eos_token_id]
    assert pc.labels == [-100] * len(p_ids) + c_ids + [tok.eos_token_id]
    text = exs[1]
    assert text.labels == text.ids and text.ids[0] == tok.bos_token_id
    assert text.ids[-1] == tok.eos_token_id
    assert stats.formats == {"prompt_completion": 1, "text": 1}


def test_messages_loss_on_assistant_turns_only(tmp_path, base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"},
            {"role": "assistant", "content": "sat on"}, {"role": "user", "content": "a dog"},
            {"role": "assistant", "content": "ran far"}]
    (ex,), _ = D.load_dataset(write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]), tok, 128)
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ex.ids) == tok.decode(tok(full, add_special_tokens=False).input_ids)
    runs, cur = [], []
    for i, lab in zip(ex.ids, ex.labels):
        if lab != -100:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    assert [tok.decode(r, skip_special_tokens=False).replace(" ", "") for r in runs] == [
        "saton</s>", "ranfar</s>"]


def test_messages_need_a_chat_template(tmp_path, base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = None
    rows = [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    with pytest.raises(D.DataError, match="chat template"):
        D.load_dataset(write_jsonl(tmp_path / "m.jsonl", rows), tok, 32)


@pytest.mark.parametrize("line,msg", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"txt": "x"}', "expected 'text', 'prompt'\\+'completion' or 'messages'"),
    ('{"prompt": "x"}', "has 'prompt' but no 'completion'"),
    ('{"text": 3}', "'text' must be a string"),
    ('{"text": "  "}', "'text' is empty"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no non-empty assistant message"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "unknown role"),
])
def test_bad_line_reported_with_line_number(tmp_path, line, msg):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"text": "fine too"}, line])
    with pytest.raises(D.DataError, match=msg) as e:
        D.read_jsonl(p)
    assert "bad.jsonl:3:" in str(e.value)


def test_packing_rows_positions_and_isolation(base):
    a = D.Example([1, 10, 11, 12, 2], [1, 10, 11, 12, 2])
    b = D.Example([1, 20, 21, 2], [-100, -100, 21, 2])
    rows = D.pack([a, b, a], seq_len=6, pad_id=0)
    assert [len(r) for r in rows] == [6, 6, 6]
    assert rows[0].ids == [1, 10, 11, 12, 2, 1] and rows[0].positions == [0, 1, 2, 3, 4, 0]
    assert rows[0].labels == [-100, 10, 11, 12, 2, -100]
    assert rows[1].positions == [0, 1, 2, 0, 1, 2] and rows[1].labels[0] == -100
    # the tail of the first example's second copy, then a padding "document" with no loss
    assert rows[2].ids == [12, 2, 0, 0, 0, 0] and rows[2].positions == [0, 1, 0, 1, 2, 3]
    assert rows[2].labels == [-100, 2, -100, -100, -100, -100]
    # attention stays inside each document: packed loss == sum of the separate losses
    model = load_model(base)
    fn = CausalLMLoss(model)
    x = D.Example(input_ids(64, 1, 7, seed=1)[0].tolist(), input_ids(64, 1, 7, seed=1)[0].tolist())
    y = D.Example(input_ids(64, 1, 5, seed=2)[0].tolist(), input_ids(64, 1, 5, seed=2)[0].tolist())
    (row,) = D.pack([x, y], seq_len=12, pad_id=0)
    b = D.collate([row], 0)
    with torch.no_grad():
        packed = fn(b["input_ids"], b["labels"], b["attention_mask"], b["position_ids"])
        sep = sum(fn(torch.tensor([e.ids]), torch.tensor([e.labels])) for e in (x, y))
    torch.testing.assert_close(packed, sep, atol=1e-5, rtol=1e-5)


def test_length_grouping_reduces_padding():
    items = [D.Item([1] * n, [1] * n) for n in [3, 50, 4, 48, 5, 47, 6, 49] * 8]
    def waste(order):
        return sum(max(len(items[i]) for i in mb) * len(mb) - sum(len(items[i]) for i in mb)
                   for mb in order)
    grouped = D.epoch_order(items, 4, seed=0, epoch=0, group_by_length=True)
    plain = D.epoch_order(items, 4, seed=0, epoch=0, group_by_length=False)
    assert sorted(i for mb in grouped for i in mb) == list(range(len(items)))
    assert waste(grouped) < waste(plain) / 5


def test_get_lr_schedules():
    c = TrainConfig(base="b", data="d", out="o", register=False, lr=1.0, warmup=10, schedule="cosine")
    assert get_lr(0, c, 110, 10) == pytest.approx(0.1)
    assert get_lr(9, c, 110, 10) == pytest.approx(1.0)
    assert get_lr(60, c, 110, 10) == pytest.approx(0.5)
    assert get_lr(110, c, 110, 10) == pytest.approx(0.0, abs=1e-12)
    c.schedule = "linear"
    assert get_lr(60, c, 110, 10) == pytest.approx(0.5)
    c.schedule = "constant"
    assert get_lr(100, c, 110, 10) == 1.0


# --- the loop --------------------------------------------------------------------------


def test_loss_goes_down_and_eval_best(tmp_path, base, corpus):
    r = train(cfg(base, corpus / "learn.jsonl", tmp_path / "out", eval=corpus / "learn.jsonl",
                  max_steps=30, batch_size=8, grad_accum=1, targets="all-linear", rank=8,
                  dropout=0.0, warmup=0, schedule="constant", eval_every=10))
    losses = [h["loss"] for h in r.history if "loss" in h]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:3]) / 3
    evals = [h for h in r.history if "eval_loss" in h]
    assert [e["step"] for e in evals] == [10, 20, 30]
    assert r.metrics["best_eval_loss"] == min(e["eval_loss"] for e in evals)
    assert r.metrics["eval_perplexity"] == pytest.approx(math.exp(r.metrics["eval_loss"]))
    assert (r.out / "best" / WEIGHTS_NAME).is_file()
    logged = [json.loads(x) for x in (r.out / "metrics.jsonl").read_text().splitlines()]
    assert logged == r.history
    # the saved final adapter reproduces the trained model's eval loss when applied anew
    model = load_model(base)
    apply_adapter(model, load_adapter(r.out))
    tok_rows = [D.Item(e.ids, e.labels) for e in D.load_dataset(
        corpus / "learn.jsonl", __import__("transformers").AutoTokenizer.from_pretrained(base), 64)[0]]
    b = D.collate(tok_rows, 0)
    with torch.no_grad():
        again = CausalLMLoss(model)(b["input_ids"], b["labels"], b["attention_mask"]) / b["n_loss"]
    assert float(again) == pytest.approx(r.metrics["eval_loss"], rel=1e-4)


def test_same_seed_same_bytes_other_seed_differs(tmp_path, base, corpus):
    kw = dict(dropout=0.1, max_steps=3)
    a = train(cfg(base, corpus / "text.jsonl", tmp_path / "a", **kw))
    b = train(cfg(base, corpus / "text.jsonl", tmp_path / "b", **kw))
    c = train(cfg(base, corpus / "text.jsonl", tmp_path / "c", seed=1, **kw))
    assert _bytes(a.out) == _bytes(b.out)
    assert _bytes(a.out) != _bytes(c.out)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]  # the curve, bit for bit


def test_loop_is_the_plain_algorithm_bit_for_bit(tmp_path, base, corpus):
    """The loop's phases (prepare, train_step, ...) compose to exactly this plain loop:
    same seeds, same data order, same loss normalisation, same AdamW steps. Every
    step's loss and the final factors must be equal, not close."""
    import random

    from adapterhub_local.trainer import data as D
    from adapterhub_local.trainer.loop import warmup_steps
    from transformers import AutoModelForCausalLM, AutoTokenizer

    c = cfg(base, corpus / "text.jsonl", tmp_path / "x", dropout=0.1, max_steps=7, onednn=False,
            threads=1, batch_size=4, grad_accum=2, warmup=2)
    r = train(c)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        model.config.use_cache = False
        torch.manual_seed(c.seed)
        random.seed(c.seed)
        layers = inject_lora(model, c.targets, c.rank, c.alpha, c.dropout, c.rslora)
        params = [p for layer in layers.values() for p in layer.lora_parameters()]
        opt = torch.optim.AdamW(params, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay)
        loss_fn = CausalLMLoss(model).train()
        tok = AutoTokenizer.from_pretrained(str(base))
        items = D.as_items(D.tokenize(D.read_jsonl(c.data), tok, c.seq_len)[0])
        per_epoch = math.ceil(math.ceil(len(items) / c.batch_size) / c.grad_accum)
        losses = []
        for step in range(c.max_steps):
            epoch, k = divmod(step, per_epoch)
            order = D.epoch_order(items, c.batch_size, c.seed, epoch, c.group_by_length)
            pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
            batches = [D.collate([items[i] for i in mb], pad)
                       for mb in order[k * c.grad_accum:(k + 1) * c.grad_accum]]
            n = sum(b["n_loss"] for b in batches)
            for g in opt.param_groups:
                g["lr"] = get_lr(step, c, c.max_steps, warmup_steps(c, c.max_steps))
            total = 0.0
            for b in batches:
                part = loss_fn(b["input_ids"], b["labels"], b["attention_mask"], b["position_ids"])
                (part * (1 / n)).backward()
                total += float(part.detach())
            torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(total / n)
    finally:
        torch.set_num_threads(threads)
    assert [h["loss"] for h in r.history if "loss" in h] == losses
    ours = load_adapter(r.out).modules
    for name, layer in lora_layers(model).items():
        a, b = layer.factors
        assert torch.equal(torch.as_tensor(ours[name].A), a.detach())
        assert torch.equal(torch.as_tensor(ours[name].B), b.detach())


@pytest.mark.parametrize("packing", [False, True])
def test_resume_equals_uninterrupted(tmp_path, base, corpus, packing):
    kw = dict(dropout=0.1, max_steps=6, save_every=3, packing=packing, seq_len=24,
              eval=corpus / "eval.jsonl", eval_every=2, batch_size=3)
    full = train(cfg(base, corpus / "text.jsonl", tmp_path / "full", **kw))
    ck = full.out / "checkpoints" / "step-000003"
    assert (ck / "trainer_state.pt").is_file() and (ck / WEIGHTS_NAME).is_file()
    load_adapter(ck)  # a checkpoint is a PEFT folder too
    resumed = train(cfg(base, corpus / "text.jsonl", tmp_path / "resumed", resume=ck, **kw))
    assert _bytes(resumed.out) == _bytes(full.out)
    assert resumed.metrics["best_eval_loss"] == full.metrics["best_eval_loss"]
    steps = [h["step"] for h in resumed.history if "loss" in h]
    assert steps == [4, 5, 6]
    def untimed(entries):
        return [{k: v for k, v in e.items() if k not in ("time", "tokens_per_s")} for e in entries]

    logged = (resumed.out / "metrics.jsonl").read_text().splitlines()
    assert untimed(json.loads(x) for x in logged) == untimed(full.history)


def test_internal_measurements_leave_the_global_rng_alone(monkeypatch):
    # the bf16 speed probe once drew from the global RNG on a process's first run, so the
    # first run's dropout masks differed from every later run's with the same seed
    from adapterhub_local.trainer import speed

    monkeypatch.setattr(speed, "_BF16_SPEEDUP", None)
    before = torch.get_rng_state()
    assert speed.cpu_bf16_speedup() > 0
    assert torch.equal(before, torch.get_rng_state())


def test_resume_refuses_changed_settings(tmp_path, base, corpus):
    from adapterhub_local.trainer.checkpoint import CheckpointError

    full = train(cfg(base, corpus / "text.jsonl", tmp_path / "a", max_steps=2, save_every=1))
    with pytest.raises(CheckpointError, match="rank"):
        train(cfg(base, corpus / "text.jsonl", tmp_path / "b", max_steps=2, rank=8,
                  resume=full.out))


def test_ctrl_c_saves_checkpoint_and_resume_finishes(tmp_path, base, corpus):
    kw = dict(dropout=0.1, max_steps=5)
    ref = train(cfg(base, corpus / "text.jsonl", tmp_path / "ref", **kw))

    def interrupt(step, entry):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    cut = train(cfg(base, corpus / "text.jsonl", tmp_path / "cut", **kw), on_step=interrupt)
    assert cut.interrupted and cut.metrics["steps"] == 2
    assert cut.checkpoint.name == "step-000002"
    assert not (cut.out / WEIGHTS_NAME).exists()  # no final adapter from a cut run
    done = train(cfg(base, corpus / "text.jsonl", tmp_path / "cut", resume=tmp_path / "cut", **kw))
    assert _bytes(done.out) == _bytes(ref.out)


def test_completion_data_trains_and_gpt2(tmp_path, gpt2_base, corpus):
    r = train(cfg(gpt2_base, corpus / "pc.jsonl", tmp_path / "g", targets="all-linear",
                  grad_checkpointing=True, max_steps=2))
    ad = load_adapter(r.out)
    assert ad.config["fan_in_fan_out"] is True and set(ad.targets()) == {"c_attn", "c_fc", "c_proj"}
    assert r.metrics["steps"] == 2 and math.isfinite(r.metrics["train_loss"])


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_trains_qwen2_and_mistral_on_chat_messages(tmp_path, arch):
    from peft import PeftModel

    folder = make_base(tmp_path / arch, arch)
    rows = [{"messages": [{"role": "user", "content": t[:8]}, {"role": "assistant", "content": t[8:] or "x"}]}
            for t in _texts(24)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    r = train(cfg(folder, data, tmp_path / "out", targets="all-linear", max_steps=3, lr=5e-2))
    ids = input_ids(vocab=64)
    model = load_model(folder)
    with torch.no_grad():
        with adapter_applied(model, load_adapter(r.out)):
            ours = model(ids).logits
        theirs = PeftModel.from_pretrained(load_model(folder), r.out).eval()(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_grad_accum_split_does_not_change_the_step(tmp_path, base, corpus):
    # global batch 8 as 1 x 8 or 4 x 2: the same gradient, up to float rounding
    a = train(cfg(base, corpus / "text.jsonl", tmp_path / "a", batch_size=8, grad_accum=1,
                  max_steps=3, dropout=0.0, group_by_length=False))
    b = train(cfg(base, corpus / "text.jsonl", tmp_path / "b", batch_size=2, grad_accum=4,
                  max_steps=3, dropout=0.0, group_by_length=False))
    ta, tb = load_adapter(a.out).to_torch().tensors(), load_adapter(b.out).to_torch().tensors()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=1e-5, rtol=1e-4)


def test_registers_with_fingerprint_metrics_and_tags(tmp_path, base, corpus):
    from adapterhub_local.registry import open_registry

    from adapterhub_local.fingerprint import fingerprint_model

    r = train(cfg(base, corpus / "text.jsonl", tmp_path / "out", name="tiny-support",
                  register=True, eval=corpus / "eval.jsonl", eval_every=2, max_steps=4))
    rec = r.record
    assert rec.ref == "tiny-support@1"
    assert rec.base_fingerprint == fingerprint_model(base).fingerprint
    for key in ("train_loss", "eval_loss", "best_eval_loss", "eval_perplexity", "tokens_seen",
                "wall_time_s"):
        assert key in rec.metrics
    assert rec.tags["rank"] == "4" and rec.tags["lr"] == "0.01"
    reg = open_registry()
    again = reg.resolve("tiny-support")
    assert again.id == rec.id
    stored = Path(reg.adapter_path(rec))
    assert (stored / WEIGHTS_NAME).read_bytes() == _bytes(r.out)
    assert sorted(rec.files) == ["adapter_config.json", "adapter_model.safetensors"]  # no logs
    assert not (r.out / ".register").exists()
    curve = reg.resolve("tiny-support")  # the eval curve went in step by step
    assert curve.metrics["eval_loss"] == pytest.approx(r.metrics["eval_loss"])


def test_divergence_is_an_error_not_a_nan_adapter(tmp_path, base, corpus):
    from adapterhub_local.trainer.loop import TrainError

    # Adam's first step moves every B entry by about lr; at 3e37 that is ~3e38, next to
    # float32's maximum, so the next forward overflows to inf and the loss is NaN on any
    # CPU. (At 1e30 nothing overflows: RMSNorm squares the 1e30 residual to inf and scales
    # it to 0, and the loss sits at ln(vocab), finite: whether it turns NaN is numerics.)
    with pytest.raises(TrainError, match="diverged: loss is nan at step 2"):
        train(cfg(base, corpus / "text.jsonl", tmp_path / "x", lr=3e37, max_steps=6,
                  max_grad_norm=None, warmup=0, schedule="constant"))
    assert not (tmp_path / "x" / WEIGHTS_NAME).exists()


@pytest.mark.parametrize("blowup_at,kw", [
    (3, {}),  # the last step: its loss was computed before the update that blew up
    (2, {"save_every": 2, "max_steps": 4}),  # a checkpoint is never written from NaN weights
])
def test_weights_that_blow_up_are_never_written(tmp_path, base, corpus, monkeypatch, blowup_at, kw):
    from adapterhub_local.trainer.loop import TrainError

    class BlowUp(torch.optim.AdamW):
        n = 0

        def step(self, closure=None):
            out = super().step(closure)
            BlowUp.n += 1
            if BlowUp.n == blowup_at:
                with torch.no_grad():
                    self.param_groups[0]["params"][-1].view(-1)[0] = math.inf
            return out

    monkeypatch.setattr(torch.optim, "AdamW", BlowUp)
    out = tmp_path / "x"
    with pytest.raises(TrainError, match=f"diverged: the LoRA weights are not finite after step {blowup_at}"):
        train(cfg(base, corpus / "text.jsonl", out, **{"max_steps": 3, **kw}))
    assert BlowUp.n == blowup_at
    assert not (out / WEIGHTS_NAME).exists() and not (out / "checkpoints").exists()


def test_bf16_refused_on_cpu_without_bf16(tmp_path, base, corpus, monkeypatch):
    from adapterhub_local.trainer import loop

    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: False)
    with pytest.raises(loop.TrainConfigError, match="bfloat16"):
        train(cfg(base, corpus / "text.jsonl", tmp_path / "x", bf16=True))
    # where it is supported, autocast runs (a 2-step run on the tiny model is cheap either way)
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: True)
    r = train(cfg(base, corpus / "text.jsonl", tmp_path / "y", bf16=True, max_steps=1))
    assert load_adapter(r.out).modules  # factors stay float32
    assert next(iter(load_adapter(r.out).to_torch().modules.values())).A.dtype == torch.float32


# --- the CLI -----------------------------------------------------------------------------


def _cli_error(args, capsys):
    from adapterhub_local.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    return e.value.code, err


def test_cli_train_end_to_end(tmp_path, base, corpus):
    from click.testing import CliRunner

    from adapterhub_local.cli import cli

    res = CliRunner().invoke(cli, [
        "train", str(base), "--data", str(corpus / "pc.jsonl"), "--eval", str(corpus / "eval.jsonl"),
        "--name", "cli-run", "--out", str(tmp_path / "run"), "--rank", "4", "--alpha", "8",
        "--targets", "q_proj,v_proj", "--max-steps", "3", "--batch-size", "4", "--grad-accum", "1",
        "--eval-every", "2", "--save-every", "2", "--seq-len", "64", "--warmup", "1", "--json",
    ], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["ref"] == "cli-run@1" and out["metrics"]["steps"] == 3
    cfg_json = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert cfg_json["r"] == 4 and cfg_json["lora_alpha"] == 8
    assert sorted(cfg_json["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("args,code,msg", [
    (["--rank", "0"], 2, "--rank"),
    (["--epochs", "1", "--max-steps", "3"], 2, "--epochs or --max-steps"),
    (["--schedule", "steep"], 2, "--schedule"),
    (["--warmup", "1.5"], 2, "--warmup"),
    (["--targets", "qq_proj"], 1, "no module named qq_proj"),
    (["--name", "bad/name"], 1, "bad adapter name"),
    (["--resume", "/nonexistent/ckpt"], 1, "--resume"),
])
def test_cli_bad_flags(tmp_path, base, corpus, capsys, args, code, msg):
    argv = ["train", str(base), "--data", str(corpus / "text.jsonl"), "--out", str(tmp_path / "o"),
            "--max-steps", "1"]
    if "--name" not in args:
        argv += ["--name", "ok"]
    rc, err = _cli_error(argv + args, capsys)
    assert rc == code
    assert msg in err and "Traceback" not in err
    if code == 1:
        assert [line for line in err.splitlines() if line.startswith("error:")] == [
            err.strip().splitlines()[-1]]
    assert not (tmp_path / "o" / WEIGHTS_NAME).exists()


def test_cli_bad_data_stops_before_training(tmp_path, base, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}] * 5 + ['{"prompt": "p"}'])
    rc, err = _cli_error(["train", str(base), "--data", str(data), "--name", "x",
                          "--out", str(tmp_path / "o")], capsys)
    assert rc == 1 and "d.jsonl:6: has 'prompt' but no 'completion'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing created: we stopped before training


def test_cli_missing_base_and_tokenizer(tmp_path, corpus, capsys):
    from tiny import make_llama

    rc, err = _cli_error(["train", str(tmp_path / "nope"), "--data", str(corpus / "text.jsonl"),
                          "--name", "x"], capsys)
    assert rc == 1 and "no such directory" in err
    bare = make_llama(tmp_path / "bare")
    rc, err = _cli_error(["train", str(bare), "--data", str(corpus / "text.jsonl"), "--name", "x",
                          "--out", str(tmp_path / "o")], capsys)
    assert rc == 1 and "tokenizer" in err and "Traceback" not in err


def test_no_bare_trainer_import():
    import adapterhub_local.trainer.loop  # noqa: F401

    assert "trainer" not in sys.modules


def test_cli_ctrl_c_checkpoints_and_exits_130(tmp_path, base, corpus):
    import subprocess
    import time

    adapters = str(Path(sys.executable).parent / "adapters")
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [adapters, "train", str(base), "--data", str(corpus / "text.jsonl"), "--out", str(out),
         "--no-register", "--max-steps", "100000", "--batch-size", "2", "--grad-accum", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    ckpts = list((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "trainer_state.pt").is_file()
    assert not (out / WEIGHTS_NAME).exists()


def test_progress_bar_shows_loss_and_tokens_per_s(tmp_path, base, corpus, monkeypatch, capsys):
    monkeypatch.setenv("ADAPTERS_PROGRESS", "1")
    train(cfg(base, corpus / "text.jsonl", tmp_path / "p", max_steps=3, eval=corpus / "eval.jsonl",
              eval_every=2))
    err = capsys.readouterr().err
    assert "loss=" in err and "tok_s=" in err and "3/3" in err
    assert "step 2: eval loss" in err
