"""Tiny models and adapters built in the test run: no downloads, hidden sizes 16-64.

Shared by every test module; import as ``from tiny import ...`` (tests/ is on sys.path
through conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import torch


def make_llama(out: Path, seed: int = 0, dtype=torch.float32, tie: bool = False, layers: int = 2,
               hidden: int = 32, vocab: int = 64, max_shard_size: str | None = None) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg).to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kw)
    return Path(out)


def make_gpt2(out: Path, seed: int = 0, dtype=torch.float32, layers: int = 2, hidden: int = 32,
              vocab: int = 64) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128)
    model = GPT2LMHeadModel(cfg).to(dtype)
    model.save_pretrained(out)
    return Path(out)


def load_model(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def make_peft_adapter(base: Path, out: Path, seed: int = 1, **lora_kwargs) -> Path:
    """Save an adapter that PEFT itself creates, with B randomised (PEFT starts B at zero,
    which would make every delta zero and every test vacuous)."""
    from peft import LoraConfig, get_peft_model

    model = load_model(base)
    lora_kwargs.setdefault("r", 4)
    lora_kwargs.setdefault("lora_alpha", 8)
    lora_kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    cfg = LoraConfig(**lora_kwargs)
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(out)
    return Path(out)


def input_ids(vocab: int = 64, batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(out: Path, texts: list[str] | None = None, vocab: int = 64,
                   chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """A small BPE tokenizer (<s> prepended, </s> as eos, <pad>, a chat template) trained on
    ``texts`` and saved into ``out`` (e.g. a tiny base-model folder). Needs ``vocab`` >= the
    number of distinct characters in ``texts`` + 8."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    texts = texts or ["the quick brown fox jumps over the lazy dog", "hello world 0123456789"]
    special = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=special,
                                                      show_progress=False))
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(out)
    return Path(out)


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    """Logits of PEFT's own PeftModel with ``adapter`` active on ``base``: the reference."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base), str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids()).logits


def logits(model_dir: Path) -> torch.Tensor:
    """Logits of a plain model folder (a base, or a merged model)."""
    with torch.no_grad():
        return load_model(model_dir)(input_ids()).logits
