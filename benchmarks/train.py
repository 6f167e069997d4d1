"""Training benchmark: ours vs a bare PEFT loop vs PEFT + transformers Trainer, in one run.

Builds once (under $ADAPTERS_CACHE/bench, else ~/.cache/adapterhub-local/bench; never
in the repo) a TinyLlama-shaped base (8 layers, hidden 512, MLP 1408, GQA 8/4 heads,
vocab 32000: ~56M parameters, float32) with a word-level tokenizer (one token per
word, so lengths are exact) and two synthetic corpora from a fixed Markov chain:

  uniform   every example exactly --seq-len tokens
  mixed     lengths spread uniformly over 16..--mixed-max (512) tokens

Each run is a fresh subprocess (so peak RSS is its own), 2 torch threads, LoRA
r=16 / alpha=32 / dropout 0.05 on q_proj,v_proj, batch --batch x --seq-len,
grad-accum 1, cosine schedule with no warmup, AdamW lr 2e-4, clip 1.0, seed 0:

  bare      get_peft_model + a plain loop over the *same* batches in the same order
            as ours (so the per-step losses must agree: same math, same data)
  trainer   get_peft_model + transformers.Trainer with its defaults
            (random sampler, DataCollatorForLanguageModeling padding to the longest row)
  ours      adapterhub_local.trainer.train (fused lm_head + cross-entropy)
  ours+pack / ours+group   on mixed data: --packing / length grouping (the default)
  trainer+bf16 / ours+bf16 with --with-bf16: both under bf16 autocast (TrainingArguments
            bf16=True; ours --bf16), LoRA weights and optimizer in float32

Prints real (non-padding) tokens/s, peak RSS, final eval loss (same eval set, token-
weighted), achieved FLOP/s by the 4·N·tokens count (N = parameters doing matmuls, i.e.
all but the input embedding; a frozen base does forward + input-gradient, 2N + 2N)
against a measured float32 matmul peak, and the ratios the issue sets as targets.

Run: .venv/bin/python benchmarks/train.py [--steps 16] [--rounds 2] [--only uniform|mixed] [--with-bf16]
The machine is shared while we develop, and a busy minute can halve any run's speed:
the runs are interleaved over --rounds and each kind's best round is what counts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable
VOCAB = 32000
CFG = dict(vocab_size=VOCAB, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
           num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
           tie_word_embeddings=False, initializer_range=0.02)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
LR = 2e-4
SEED = 0


def bench_dir() -> Path:
    root = os.environ.get("ADAPTERS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "adapterhub-local")
    return Path(root) / "bench" / "train"


# --- building the base and the data ------------------------------------------------------


def build_base(path: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    tmp = path.with_name(path.name + ".partial")
    model.save_pretrained(tmp)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(tmp)
    tmp.rename(path)


def _sentence(rng: random.Random, words: int) -> str:
    # a fixed sparse Markov chain over 2000 words: learnable structure, so eval loss moves
    w = rng.randrange(4, 2004)
    out = []
    for _ in range(words):
        out.append(f"w{w}")
        w = 4 + (w * 31 + rng.choice((1, 2, 3, 5, 7, 11, 13, 17))) % 2000
    return " ".join(out)


def build_data(folder: Path, seq_len: int, mixed_max: int, n: int) -> None:
    rng = random.Random(0)
    # BOS + words + EOS = tokens
    with open(folder / "uniform.jsonl", "w") as f:
        f.writelines(json.dumps({"text": _sentence(rng, seq_len - 2)}) + "\n" for _ in range(n))
    with open(folder / "mixed.jsonl", "w") as f:
        f.writelines(json.dumps({"text": _sentence(rng, rng.randint(16, mixed_max) - 2)}) + "\n" for _ in range(n * 2))
    with open(folder / "eval.jsonl", "w") as f:
        f.writelines(json.dumps({"text": _sentence(rng, rng.randint(64, seq_len) - 2)}) + "\n" for _ in range(16))


def measure_matmul_peak(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    n = 1536
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        best = max(best, 3 * 2 * n ** 3 / (time.perf_counter() - t))
    return best


# --- children: one run each, JSON on the last stdout line ----------------------------------


def _eval_loss(model, eval_path, tok, seq_len) -> float:
    """Token-weighted mean next-token loss over the eval file, through model(...).logits."""
    import torch
    from adapterhub_local.trainer import data as D

    exs, _ = D.load_dataset(eval_path, tok, seq_len)
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(exs), 4):
            b = D.collate(D.as_items(exs[i:i + 4]), 0)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            y = b["labels"][:, 1:]
            keep = y != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], y[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(kind: str, a: dict) -> dict:
    import torch

    torch.set_num_threads(a["threads"])
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    base, data, ev = a["base"], a["data"], a["eval"]
    tok = AutoTokenizer.from_pretrained(base)
    res: dict = {"kind": kind}

    if kind.startswith("ours"):
        from adapterhub_local.trainer import TrainConfig, train

        cfg = TrainConfig(base=base, data=data, out=a["out"], register=False, overwrite=True,
                          rank=LORA["r"], alpha=LORA["lora_alpha"], dropout=LORA["lora_dropout"],
                          targets=",".join(LORA["target_modules"]), lr=LR, warmup=0, schedule="cosine",
                          max_steps=a["steps"], batch_size=a["batch"], grad_accum=1,
                          seq_len=a["seq_len"], packing=a.get("packing", False),
                          group_by_length=a.get("group", True), seed=SEED, threads=a["threads"],
                          bf16=a.get("bf16", False))
        r = train(cfg)
        steps = [h for h in r.history if "loss" in h]
        res.update(step_times=[h["time"] for h in steps], step_tokens=[h["tokens"] for h in steps],
                   losses=[h["loss"] for h in steps])
        from adapterhub_local.trainer import apply_adapter

        from adapterhub_local.peft_format import load_adapter

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        apply_adapter(model, load_adapter(r.out))
        res["eval_loss"] = _eval_loss(model, ev, tok, a["seq_len"])
    else:
        from adapterhub_local.trainer import data as D
        from peft import LoraConfig, get_peft_model

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model.config.use_cache = False
        torch.manual_seed(SEED)  # same draws for A as ours
        pm = get_peft_model(model, LoraConfig(**LORA))
        exs, _ = D.load_dataset(data, tok, a["seq_len"])
        if kind == "bare":
            from adapterhub_local.trainer.config import TrainConfig
            from adapterhub_local.trainer.loop import get_lr

            sched = TrainConfig(base=base, data=data, out="x", register=False, lr=LR, warmup=0)
            params = [p for p in pm.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
            items = D.as_items(exs)
            order = D.epoch_order(items, a["batch"], SEED, 0, True)  # ours' order, batch for batch
            pm.train()
            losses, tokens, times, cum = [], 0, [], []
            for step in range(a["steps"]):
                b = D.collate([items[i] for i in order[step]], 0)
                for g in opt.param_groups:
                    g["lr"] = get_lr(step, sched, a["steps"], 0)
                out = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(out.loss))
                tokens += b["n_tokens"]
                times.append(time.perf_counter())
                cum.append(tokens)
            res.update(step_times=times, step_tokens=cum, losses=losses)
        else:
            import tempfile

            from transformers import (
                DataCollatorForLanguageModeling,
                Trainer,
                TrainerCallback,
                TrainingArguments,
            )

            inner = DataCollatorForLanguageModeling(tok, mlm=False)
            batch_tokens, times = [], []

            def collator(rows):
                b = inner(rows)
                batch_tokens.append(int(b["attention_mask"].sum()))
                return b

            class Clock(TrainerCallback):
                def on_step_end(self, args, state, control, **kw):
                    times.append(time.perf_counter())

            rows = [{"input_ids": e.ids} for e in exs]
            with tempfile.TemporaryDirectory() as tmp:
                args = TrainingArguments(
                    output_dir=tmp, per_device_train_batch_size=a["batch"], gradient_accumulation_steps=1,
                    max_steps=a["steps"], learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0,
                    weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                    report_to="none", use_cpu=True, seed=SEED, disable_tqdm=True,
                    bf16=a.get("bf16", False))
                trainer = Trainer(model=pm, args=args, train_dataset=rows, data_collator=collator,
                                  callbacks=[Clock()])
                trainer.train()
            # the dataloader may fetch a batch ahead: the first len(times) batches were trained on
            cum = [sum(batch_tokens[:i + 1]) for i in range(len(times))]
            res.update(step_times=times, step_tokens=cum,
                       losses=[h["loss"] for h in trainer.state.log_history if "loss" in h])
        res["eval_loss"] = _eval_loss(pm, ev, tok, a["seq_len"])
    # steady state: from the end of step 1 (allocator and kernel warm-up) to the end of the last
    t, n = res["step_times"], res["step_tokens"]
    res["seconds"] = t[-1] - t[0]
    res["tokens"] = n[-1] - n[0]
    res["tokens_per_s"] = res["tokens"] / res["seconds"]
    res["peak_rss_mb"] = _peak_rss_mb()
    return res


def run_child(kind: str, a: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(a["threads"]), "ADAPTERS_PROGRESS": "0"}
    proc = subprocess.run([PY, __file__, "--child", kind, "--args", json.dumps(a)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{kind} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256, help="uniform rows; eval lengths 64..this")
    ap.add_argument("--mixed-max", type=int, default=512,
                    help="mixed data: lengths uniform over 16..this; --seq-len for those runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["uniform", "mixed"])
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repeats; best of each kept")
    ap.add_argument("--with-bf16", action="store_true",
                    help="also run ours --bf16 and PEFT+Trainer bf16=True on uniform data "
                         "(not part of the fp32 targets)")
    ap.add_argument("--child")
    ap.add_argument("--args")
    o = ap.parse_args()
    if o.child:
        print(json.dumps(child(o.child, json.loads(o.args))))
        return

    root = bench_dir()
    root.mkdir(parents=True, exist_ok=True)
    base = root / "llama-56m"
    if not base.exists():
        print(f"building {base} ...", file=sys.stderr)
        build_base(base)
    data = root / f"data-{o.seq_len}-{o.mixed_max}-{o.steps * o.batch}"
    if not (data / "eval.jsonl").exists():
        data.mkdir(exist_ok=True)
        build_data(data, o.seq_len, o.mixed_max, n=max(64, o.steps * o.batch * 2))
    import torch  # noqa: F401  (after the children's env is settled)
    from transformers import AutoConfig

    n_params = _matmul_params(base)
    peak = measure_matmul_peak(o.threads)
    print(f"base: TinyLlama-shaped, {n_params / 1e6:.1f}M matmul parameters; float32 matmul peak on "
          f"{o.threads} threads: {peak / 1e9:.1f} GFLOP/s", flush=True)
    print(f"LoRA r=16 q,v; batch {o.batch}; uniform rows of {o.seq_len} tokens, mixed 16..{o.mixed_max}; "
          f"{o.steps} steps; fp32; {o.threads} threads\n", flush=True)
    del AutoConfig
    common = {"base": str(base), "eval": str(data / "eval.jsonl"), "steps": o.steps, "batch": o.batch,
              "seq_len": o.seq_len, "threads": o.threads, "out": str(root / "out")}
    plan = []
    if o.only in (None, "uniform"):
        u = {**common, "data": str(data / "uniform.jsonl")}
        plan += [("uniform", kind, kind, u) for kind in ("bare", "trainer", "ours")]
        if o.with_bf16:  # both with bf16 autocast: apples to apples
            plan += [("uniform", "trainer+bf16", "trainer", {**u, "bf16": True}),
                     ("uniform", "ours+bf16", "ours", {**u, "bf16": True})]
    if o.only in (None, "mixed"):
        m = {**common, "data": str(data / "mixed.jsonl"), "seq_len": o.mixed_max}
        plan += [("mixed", "trainer", "trainer", m), ("mixed", "ours+pack", "ours", {**m, "packing": True}),
                 ("mixed", "ours+group", "ours", {**m, "group": True})]
    # The machine is shared: interleave the runs and keep each one's best round, so a
    # busy minute slows every kind alike instead of whichever happened to run then.
    results: dict = {}
    for rnd in range(o.rounds):
        peak = max(peak, measure_matmul_peak(o.threads)) if rnd else peak
        order = plan if rnd % 2 == 0 else plan[::-1]
        for data_name, kind, child_kind, args in order:
            r = _show(f"{data_name}", kind, run_child(child_kind, args), n_params, peak, rnd + 1)
            best = results.get((data_name, kind))
            if best is None or r["tokens_per_s"] > best["tokens_per_s"]:
                results[(data_name, kind)] = r
    print(f"\nbest of {o.rounds} interleaved round(s) (matmul peak {peak / 1e9:.1f} GFLOP/s):")
    for (data_name, kind), r in results.items():
        _show(data_name, kind, r, n_params, peak)
    print()
    _ratios(results)


def _matmul_params(base: Path) -> int:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(base)
    h, i, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = h // c.num_attention_heads * c.num_key_value_heads
    return L * (2 * h * h + 2 * h * kv + 3 * h * i) + V * h  # + lm_head; input embedding excluded


def _show(data: str, kind: str, r: dict, n_params: int, peak: float, rnd: int | None = None) -> dict:
    flops = 4 * n_params * r["tokens_per_s"]
    r["flops"] = flops
    tag = f"r{rnd} " if rnd else ""
    print(f"{tag}{data:8s} {kind:11s} {r['tokens_per_s']:8.1f} tok/s  peak RSS {r['peak_rss_mb']:7.0f} MB  "
          f"eval loss {r['eval_loss']:.4f}  {flops / 1e9:6.1f} GFLOP/s ({flops / peak:.0%} of peak)  "
          f"[{r['tokens']} real tokens in {r['seconds']:.1f} s after step 1]", flush=True)
    return r


def _ratios(res: dict) -> None:
    def ratio(a, b, key="tokens_per_s"):
        return res[a][key] / res[b][key] if a in res and b in res else None

    checks = [
        ("uniform: ours / bare PEFT loop tokens/s (target >= 1.0)", ratio(("uniform", "ours"), ("uniform", "bare"))),
        ("uniform: ours / PEFT+Trainer tokens/s (target >= 1.2)", ratio(("uniform", "ours"), ("uniform", "trainer"))),
        ("uniform: ours / PEFT+Trainer peak RSS (target <= 1.0)",
         ratio(("uniform", "ours"), ("uniform", "trainer"), "peak_rss_mb")),
        ("uniform: ours / bare PEFT peak RSS (target <= 1.0)",
         ratio(("uniform", "ours"), ("uniform", "bare"), "peak_rss_mb")),
        ("uniform bf16: ours+bf16 / PEFT+Trainer+bf16 tokens/s (no target)",
         ratio(("uniform", "ours+bf16"), ("uniform", "trainer+bf16"))),
        ("uniform bf16: ours+bf16 / PEFT+Trainer+bf16 peak RSS (no target)",
         ratio(("uniform", "ours+bf16"), ("uniform", "trainer+bf16"), "peak_rss_mb")),
        ("mixed: ours+pack / PEFT+Trainer real tokens/s (target >= 1.5)",
         ratio(("mixed", "ours+pack"), ("mixed", "trainer"))),
        ("mixed: ours+group / PEFT+Trainer real tokens/s (target >= 1.5)",
         ratio(("mixed", "ours+group"), ("mixed", "trainer"))),
    ]
    for label, v in checks:
        if v is not None:
            print(f"{label}: {v:.2f}x")
    if ("uniform", "ours") in res and ("uniform", "bare") in res:
        a, b = res[("uniform", "ours")]["losses"], res[("uniform", "bare")]["losses"]
        diff = max(abs(x - y) for x, y in zip(a, b))
        print(f"uniform: loss curves ours vs bare PEFT loop, same seed and batches: max |diff| = {diff:.2e} "
              f"over {len(a)} steps (first {a[0]:.4f} vs {b[0]:.4f}, last {a[-1]:.4f} vs {b[-1]:.4f})")


if __name__ == "__main__":
    main()
