"""The demo's embedded default base: a small Llama-shaped causal LM, built offline.

No pretrained model can be had from a package without a download, so the demo
builds one from a transformers config, with a word-level tokenizer over the
bundled corpus' vocabulary, and pre-trains it briefly on the general corpus
(corpus.general). It is a real base: its loss is far below a random model's
ln(vocab). The result is an ordinary Hugging Face folder (config.json,
model.safetensors, tokenizer.json, ...), cached under
``paths.cache_dir()/demo-base/<size>-<key>/`` so a second run starts at once;
the key changes whenever the corpus, the size or the recipe changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import corpus

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
INFO_NAME = "demo_base.json"


@dataclass(frozen=True)
class BaseSpec:
    """Size and pre-training recipe of the demo base."""

    name: str = "demo-llama"
    hidden: int = 96
    layers: int = 3
    heads: int = 4
    intermediate: int = 256
    seq_len: int = 64
    batch_size: int = 32
    steps: int = 250
    lr: float = 3e-3
    warmup: int = 20
    n_texts: int = 12000
    domain_share: float = 0.02  # of n_texts, per domain
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "corpus": corpus.CORPUS_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


DEFAULT = BaseSpec()
QUICK = BaseSpec(name="demo-llama-quick", hidden=48, layers=2, heads=4, intermediate=96,
                 batch_size=16, steps=120, lr=5e-3, warmup=10, n_texts=3000)


def make_tokenizer(out_dir: Path | None = None, words: list[str] | None = None):
    """A word-level fast tokenizer over ``words`` (default: the corpus vocabulary).

    Adds ``<s>`` in front of every text, the way Llama tokenizers do; ``</s>`` ends
    an example where the caller appends it.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = words if words is not None else corpus.vocabulary()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", model_max_length=256, clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def _lr(step: int, spec: BaseSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _blocks(tokenizer, texts: list[str], seq_len: int):
    """Pack texts (``<s> … </s>``) into one stream, cut into blocks of ``seq_len`` tokens."""
    import torch

    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _block_loss(model, blocks, batch_size: int = 64) -> float:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            x = blocks[i:i + batch_size]
            out = model(input_ids=x, labels=x)
            n = x.numel() - x.shape[0]
            total += float(out.loss) * n
            count += n
    return total / count


def pretraining_texts(spec: BaseSpec) -> list[str]:
    """Mostly general stories, plus a small share of each domain (seeds disjoint from the
    domain train/eval files): a base that knows a little of everything, as real ones do."""
    import random

    texts = corpus.generate("general", spec.n_texts, seed=spec.seed + 1)
    n_domain = int(spec.n_texts * spec.domain_share)
    for domain in corpus.DOMAINS:
        texts += corpus.generate(domain, n_domain, seed=spec.seed + 100)
    random.Random(spec.seed).shuffle(texts)
    return texts


def build_base(out: Path, spec: BaseSpec = DEFAULT, log=print) -> dict:
    """Build, pre-train and save the demo base into ``out`` (atomic); returns its info dict."""

    with one_thread():
        return _build_base(out, spec, log)


@contextlib.contextmanager
def one_thread():
    """Run torch on one CPU thread: this model's matmuls are too small to gain from a
    second thread, and on a busy machine OpenMP's spinning threads make it 5x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _build_base(out: Path, spec: BaseSpec, log) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..fsutil import atomic_dir
    from ..progress import bar

    t0 = time.perf_counter()
    torch.manual_seed(spec.seed)
    tokenizer = make_tokenizer()
    vocab_size = len(tokenizer)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())

    train = _blocks(tokenizer, pretraining_texts(spec), spec.seq_len)
    held_out = _blocks(tokenizer, corpus.generate("general", 200, seed=spec.seed + 2), spec.seq_len)
    model.eval()
    random_loss = _block_loss(model, held_out)
    log(f"demo base {spec.name}: {n_params / 1e6:.2f}M parameters, vocab {vocab_size}; "
        f"pre-training {spec.steps} steps of {spec.batch_size}x{spec.seq_len} tokens "
        f"(random init: loss {random_loss:.3f}, ln(vocab) = {math.log(vocab_size):.3f})")

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(spec.seed)
    losses = []
    with bar(spec.steps, "pre-training demo base", "step") as pbar:
        for step in range(spec.steps):
            for group in opt.param_groups:
                group["lr"] = _lr(step, spec)
            idx = torch.randint(0, len(train), (spec.batch_size,), generator=g)
            x = train[idx]
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            pbar.set_postfix(loss=f"{losses[-1]:.3f}")
            pbar.update()
    model.eval()
    final_loss = _block_loss(model, held_out)
    seconds = time.perf_counter() - t0
    info = {
        "name": spec.name, "key": spec.key(), "spec": asdict(spec), "corpus_version": corpus.CORPUS_VERSION,
        "parameters": n_params, "vocab_size": vocab_size, "random_init_loss": random_loss,
        "ln_vocab": math.log(vocab_size), "pretrained_loss": final_loss,
        "train_loss_first": losses[0], "train_loss_last": losses[-1], "seconds": seconds,
    }
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Writing model shards" bar ignores our quiet mode
    staged = out.with_name(f".{out.name}.build-{os.getpid()}")
    with atomic_dir(staged, overwrite=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    try:
        os.rename(staged, out)  # fails if another run finished first: keep theirs, never
    except OSError:             # swap a folder that run may be reading from
        shutil.rmtree(staged, ignore_errors=True)
        theirs = base_info(out)
        if theirs is None:
            raise
        log(f"another run cached the demo base first; using {out}")
        return theirs
    log(f"demo base pre-trained in {seconds:.0f} s: held-out loss {final_loss:.3f} "
        f"(random init {random_loss:.3f}); cached at {out}")
    return info


def base_info(model_dir: Path) -> dict | None:
    path = Path(model_dir) / INFO_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def cached_base_dir(spec: BaseSpec = DEFAULT) -> Path:
    from ..paths import cache_dir

    return cache_dir() / "demo-base" / f"{spec.name}-{spec.key()}"


def ensure_base(spec: BaseSpec = DEFAULT, rebuild: bool = False, log=print) -> tuple[Path, dict, bool]:
    """(folder, info, was_cached): the cached demo base, built first when missing."""
    out = cached_base_dir(spec)
    info = base_info(out)
    if info is not None and not rebuild and (out / "config.json").is_file():
        return out, info, True
    if out.exists():  # --rebuild-base, or a folder without its info file
        shutil.rmtree(out)
    info = build_base(out, spec, log=log)
    return out, info, False
