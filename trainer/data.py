"""Training data: JSONL in, token ids and labels out, in batches.

Three line formats (they may be mixed in one file):

    {"text": "..."}                                   loss on every token
    {"prompt": "...", "completion": "..."}            loss on the completion only
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
                                                      the tokenizer's chat template;
                                                      loss on assistant turns only

Every line is checked before any training starts; a bad one is reported as
``file:LINE: problem``. Labels use -100 for tokens that carry no loss, the
Hugging Face convention; ``labels[t]`` is the token predicted from ``ids[:t]``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AdapterHubError

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool", "developer")


class DataError(AdapterHubError):
    """A data file that cannot be trained on (names file and line)."""


@dataclass
class Example:
    ids: list[int]
    labels: list[int]
    line: int = 0

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Item:
    """One row of a micro-batch: a single example, or a packed chunk of several."""

    ids: list[int]
    labels: list[int]
    positions: list[int] | None = None  # restarts at each packed document

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class DataStats:
    path: str
    examples: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    tokens: int = 0  # after truncation
    loss_tokens: int = 0
    truncated: int = 0
    dropped: int = 0  # examples left with no loss token after truncation

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# --- reading and validating ----------------------------------------------------------


def read_jsonl(path: str | Path) -> list[tuple[int, dict, str]]:
    """Parse and validate every line; returns [(line number, record, format)].

    Raises DataError on the first bad line, before anything is tokenized.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a .jsonl file")
    out = []
    try:
        fh = path.open(encoding="utf-8")
        lines = list(fh)
        fh.close()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path}:{i}"
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        out.append((i, rec, _format_of(rec, where)))
    if not out:
        raise DataError(f"{path}: no examples (the file is empty)")
    return out


def _text_field(rec: dict, key: str, where: str, allow_empty: bool = False) -> str:
    v = rec[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise DataError(f"{where}: {key!r} is empty")
    return v


def _format_of(rec: dict, where: str) -> str:
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: messages[{j}] must be an object with 'role' and 'content'")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: messages[{j}] has unknown role {m['role']!r}",
                                f"valid: {', '.join(ROLES)}")
            if not isinstance(m["content"], str):
                raise DataError(f"{where}: messages[{j}].content must be a string")
        if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            raise DataError(f"{where}: no non-empty assistant message, so nothing to learn")
        return "messages"
    if "prompt" in rec or "completion" in rec:
        if "prompt" not in rec or "completion" not in rec:
            have = "prompt" if "prompt" in rec else "completion"
            miss = "completion" if have == "prompt" else "prompt"
            raise DataError(f"{where}: has {have!r} but no {miss!r}")
        _text_field(rec, "prompt", where, allow_empty=True)
        _text_field(rec, "completion", where)
        return "prompt_completion"
    if "text" in rec:
        _text_field(rec, "text", where)
        return "text"
    keys = ", ".join(sorted(rec)[:5]) or "none"
    raise DataError(f"{where}: expected 'text', 'prompt'+'completion' or 'messages' (found: {keys})")


# --- tokenizing ----------------------------------------------------------------------


def _ids(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=special)["input_ids"]


def _strip_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[:-1] if eos is not None and ids and ids[-1] == eos else ids


def chat_segments(tokenizer, messages: list[dict], where: str) -> list[tuple[str, bool]]:
    """Render with the chat template into [(text, is_assistant)], by rendering each
    prefix: the assistant turn is what the full conversation adds after the generation prompt."""
    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    try:
        full = render(messages, False)
        segments, pos = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            pre = render(messages[:i], True) if i else render([], True)
            upto = render(messages[: i + 1], False)
            if not (full.startswith(upto) and upto.startswith(pre) and len(pre) >= pos):
                raise DataError(
                    f"{where}: the tokenizer's chat template does not render conversations "
                    "prefix by prefix, so assistant turns cannot be located",
                    "use prompt/completion lines instead")
            segments.append((pre[pos:], False))
            segments.append((upto[len(pre):], True))
            pos = len(upto)
        segments.append((full[pos:], False))
    except DataError:
        raise
    except Exception as e:  # jinja errors, templates that reject a role order, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{where}: the chat template failed on this conversation ({msg})") from None
    return [(t, a) for t, a in segments if t]


def tokenize(records: list[tuple[int, dict, str]], tokenizer, seq_len: int, path: str = "",
             truncate: bool = True) -> tuple[list[Example], DataStats]:
    """Token ids and labels for every record (batched tokenizer calls per format)."""
    stats = DataStats(path=str(path))
    eos = tokenizer.eos_token_id
    eos_tail = [eos] if eos is not None else []
    by_fmt: dict[str, list[tuple[int, dict]]] = {}
    for line, rec, fmt in records:
        by_fmt.setdefault(fmt, []).append((line, rec))
        stats.formats[fmt] = stats.formats.get(fmt, 0) + 1
    examples: list[Example] = []
    if "text" in by_fmt:
        rows = by_fmt["text"]
        for (line, _), ids in zip(rows, _ids(tokenizer, [r["text"] for _, r in rows], True)):
            ids = _strip_eos(list(ids), eos) + eos_tail
            examples.append(Example(ids, list(ids), line))
    if "prompt_completion" in by_fmt:
        rows = by_fmt["prompt_completion"]
        p_ids = _ids(tokenizer, [r["prompt"] for _, r in rows], True)
        c_ids = _ids(tokenizer, [r["completion"] for _, r in rows], False)
        for (line, _), p, c in zip(rows, p_ids, c_ids):
            p = _strip_eos(list(p), eos)
            c = _strip_eos(list(c), eos) + eos_tail
            examples.append(Example(p + c, [IGNORE] * len(p) + c, line))
    if "messages" in by_fmt:
        if not getattr(tokenizer, "chat_template", None):
            line = by_fmt["messages"][0][0]
            raise DataError(f"{path}:{line}: 'messages' needs a chat template, and this tokenizer "
                            "has none", "use prompt/completion lines, or add a chat_template to "
                            "tokenizer_config.json")
        for line, rec in by_fmt["messages"]:
            segs = chat_segments(tokenizer, rec["messages"], f"{path}:{line}")
            seg_ids = _ids(tokenizer, [t for t, _ in segs], False)
            ids, labels = [], []
            for (_, is_asst), s in zip(segs, seg_ids):
                ids += s
                labels += s if is_asst else [IGNORE] * len(s)
            examples.append(Example(ids, labels, line))
    examples.sort(key=lambda e: e.line)  # file order, whatever the formats
    kept = []
    for ex in examples:
        if truncate and len(ex.ids) > seq_len:
            ex.ids, ex.labels = ex.ids[:seq_len], ex.labels[:seq_len]
            stats.truncated += 1
        if not any(lb != IGNORE for lb in ex.labels[1:]):
            stats.dropped += 1
            continue
        kept.append(ex)
        stats.tokens += len(ex.ids)
        stats.loss_tokens += sum(1 for lb in ex.labels[1:] if lb != IGNORE)
    stats.examples = len(kept)
    if not kept:
        raise DataError(f"{path}: no example has a token to learn from after truncation to "
                        f"--seq-len {seq_len}", "raise --seq-len or shorten the prompts")
    return kept, stats


def load_dataset(path, tokenizer, seq_len: int, truncate: bool = True) -> tuple[list[Example], DataStats]:
    return tokenize(read_jsonl(path), tokenizer, seq_len, str(path), truncate)


# --- packing, ordering, batching ---------------------------------------------------------


def pack(examples: list[Example], seq_len: int, pad_id: int) -> list[Item]:
    """Concatenate examples into rows of exactly ``seq_len`` tokens.

    Position ids restart at every document, so attention stays inside a document
    (transformers builds a block-diagonal mask from them); the first token of each
    document gets no label, so nothing is predicted across a boundary. The last,
    short row is filled with a padding "document" that carries no loss.
    """
    items: list[Item] = []
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for ex in examples:
        e_ids, e_lab = ex.ids, [IGNORE] + ex.labels[1:]
        start = 0
        while start < len(e_ids):
            take = min(seq_len - len(ids), len(e_ids) - start)
            ids += e_ids[start:start + take]
            lab = e_lab[start:start + take]
            if start > 0 and lab:  # a document continued from the previous row
                lab = [IGNORE] + lab[1:]
            labels += lab
            pos += list(range(take))
            start += take
            if len(ids) == seq_len:
                items.append(Item(ids, labels, pos))
                ids, labels, pos = [], [], []
    if ids:
        fill = seq_len - len(ids)
        items.append(Item(ids + [pad_id] * fill, labels + [IGNORE] * fill, pos + list(range(fill))))
    return items


def as_items(examples: list[Example]) -> list[Item]:
    return [Item(e.ids, e.labels) for e in examples]


def epoch_order(items: list[Item], micro: int, seed: int, epoch: int,
                group_by_length: bool) -> list[list[int]]:
    """Global micro-batches (lists of item indices) for one epoch: a seeded shuffle;
    with length grouping, sorted by length inside mega-batches of 64 micro-batches
    (so padding is small and order still random), then the micro-batches shuffled."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(items), generator=g).tolist()
    if group_by_length:
        mega = micro * 64
        grouped = []
        for s in range(0, len(perm), mega):
            chunk = sorted(perm[s:s + mega], key=lambda i: -len(items[i]))
            grouped += chunk
        batches = [grouped[s:s + micro] for s in range(0, len(grouped), micro)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in order]
    return [perm[s:s + micro] for s in range(0, len(perm), micro)]


def rank_slice(batch: list[int], rank: int, world: int, per_rank: int) -> list[int]:
    return batch[rank * per_rank:(rank + 1) * per_rank]


def collate(rows: list[Item], pad_id: int, device="cpu") -> dict:
    """Right-pad to the longest row; no attention mask when nothing is padded (faster
    kernels), position ids for packed rows (which are never padded)."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    padded = any(len(r) != n for r in rows)
    mask = torch.zeros((len(rows), n), dtype=torch.long) if padded else None
    positions = None
    if rows[0].positions is not None:
        positions = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r.ids)
        labels[i, :len(r)] = torch.tensor(r.labels)
        if mask is not None:
            mask[i, :len(r)] = 1
        if positions is not None:
            positions[i, :len(r)] = torch.tensor(r.positions)
    batch = {"input_ids": ids.to(device), "labels": labels.to(device),
             "attention_mask": None if mask is None else mask.to(device),
             "position_ids": None if positions is None else positions.to(device)}
    batch["n_loss"] = int((labels[:, 1:] != IGNORE).sum())
    batch["n_tokens"] = int(mask.sum()) if mask is not None else ids.numel()
    return batch


def eval_batches(examples: list[Example], batch_size: int, pad_id: int, device="cpu",
                 rank: int = 0, world: int = 1) -> list[dict]:
    """This rank's share of an eval set, sorted by length (little padding; a summed loss
    does not depend on the order), in collated batches of ``batch_size`` rows."""
    items = sorted(as_items(examples), key=len)[rank::world]
    return [collate(items[i:i + batch_size], pad_id, device) for i in range(0, len(items), batch_size)]


def num_micro_batches(n_items: int, micro: int) -> int:
    return math.ceil(n_items / micro)
