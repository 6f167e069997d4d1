"""Merge adapters into a base model, streaming: W' = W + Σ wᵢ·sᵢ·BᵢAᵢ.

One pass over the base, shard by shard, tensor by tensor:

* an untouched tensor is copied in 1 MiB chunks (no torch, no float32);
* a touched tensor is read in row blocks into two alternating buffers; each
  block is upcast into a preallocated float32 block, every adapter's factors
  for that module are applied as ONE product (``addmm_`` with the factors of
  all adapters concatenated along the rank), cast once to the output dtype and
  written. Memory is a few MiB of buffers plus the adapters, whatever the model.

The base fingerprint is verified on the way: each tensor's digest is computed
from the bytes already read, on a hashing thread that overlaps the arithmetic;
when the base's cached fingerprint is still valid (same files, sizes, mtimes)
it is reused and nothing is hashed. The output directory is a temp dir renamed
into place only after every byte is written and the fingerprint matched.

This module must not import transformers (6-8 s of start-up for nothing).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AdapterHubError, BaseMismatch, InvalidAdapter, ShapeMismatch
from ..fingerprint import FP_PREFIX, Fingerprint, _tensor_head, cached_fingerprint, combine, store_fingerprint
from ..fsutil import atomic_dir
from ..lora import LoraModule
from .inputs import MergeInput
from .io import (FLOAT_ST, INDEX_NAME, ITEMSIZE, ST_TO_TORCH, OutTensor, Reader, index_json, numel,
                 output_dtype, parse_size, plan_shards, scan_model, shard_header, shard_names, side_files)
from .report import MergeReport, stderr_notify

CHUNK = 1024 * 1024  # copy / hash granularity for untouched tensors
WRITE_PIECE = 256 * 1024
WRITEBACK = 64 * 1024 * 1024  # start writeback of the output every 64 MiB
MATMUL_SPLIT_MIN_RANK = 64  # below this stacked rank a product is memory-bound: one thread
BLOCK_ELEMS = 1024 * 1024  # elements per row block (4 MiB in float32)
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                  "tok_embeddings.weight", "embeddings.weight")
LM_HEAD = "lm_head.weight"


@dataclass
class _Edit:
    """Everything that happens to one output tensor."""

    deltas: list[tuple[LoraModule, float]] = field(default_factory=list)
    bias: list[tuple[LoraModule, float]] = field(default_factory=list)
    replace: tuple[torch.Tensor, str] | None = None  # modules_to_save: (tensor, input label)
    saved_base: list[tuple[torch.Tensor, str]] = field(default_factory=list)  # a target's saved base layer

    def touches(self) -> bool:
        return bool(self.deltas or self.bias or self.replace is not None or self.saved_base)


def _load_config(base_dir: Path) -> dict:
    path = base_dir / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        from ..errors import InvalidModel

        raise InvalidModel(path, "not valid JSON") from None


def _embedding_key(infos, config: dict) -> str | None:
    vocab = config.get("vocab_size")
    named = [k for k in infos if k.endswith(EMBED_SUFFIXES) and len(infos[k].shape) == 2
             and (vocab is None or infos[k].shape[0] == vocab)]
    if len(named) == 1:
        return named[0]
    hidden = config.get("hidden_size") or config.get("n_embd") or config.get("d_model")
    if vocab and hidden:
        cands = [k for k, i in infos.items() if list(i.shape) == [vocab, hidden]]
        if len(cands) == 1:
            return cands[0]
    return None


def _plan_edits(inputs: list[MergeInput], infos, tied_embed: str | None, report: MergeReport):
    """Map output tensor name -> _Edit; check names and shapes before any work starts."""
    edits: dict[str, _Edit] = {}
    available = set(infos) | ({LM_HEAD} if tied_embed else set())

    def shape_of(key):
        return list(infos[tied_embed if key == LM_HEAD and key not in infos else key].shape)

    def dtype_of(key):
        return infos[tied_embed if key == LM_HEAD and key not in infos else key].dtype

    for inp in inputs:
        where = str(inp.folder)
        module_keys = {m.weight_key for m in inp.adapter.modules.values()}
        for m in inp.adapter.modules.values():
            key = m.weight_key
            if key not in available:
                raise InvalidAdapter(where, f"module {m.name} targets {key}, which the base model does not have",
                                     "this adapter was trained for a different architecture")
            if list(m.delta_shape) != shape_of(key):
                raise ShapeMismatch(m.name, shape_of(key), m.delta_shape, where=inp.ref)
            if dtype_of(key) not in FLOAT_ST:
                raise InvalidAdapter(where, f"{key} has dtype {dtype_of(key)}; only floating-point weights "
                                     "can take a LoRA delta")
            if inp.weight != 0:
                edits.setdefault(key, _Edit()).deltas.append((m, inp.weight))
            if m.bias is not None:
                bkey = m.bias_key
                if bkey not in infos:
                    raise InvalidAdapter(where, f"{m.name} has lora_B.bias but the base layer has no bias "
                                         f"({bkey} is missing)", "lora_bias needs a base layer with a bias")
                if list(infos[bkey].shape) != [m.B.shape[0]]:
                    raise ShapeMismatch(bkey, infos[bkey].shape, [m.B.shape[0]], where=inp.ref)
                if inp.weight != 0:
                    edits.setdefault(bkey, _Edit()).bias.append((m, inp.weight))
        for key, tensor in inp.adapter.extra.items():
            if key not in available:
                raise InvalidAdapter(where, f"modules_to_save tensor {key} is not in the base model")
            if list(tensor.shape) != shape_of(key):
                raise ShapeMismatch(key, shape_of(key), tensor.shape, where=f"{inp.ref} (modules_to_save)")
            if inp.weight == 0:
                continue
            e = edits.setdefault(key, _Edit())
            if key in module_keys:
                # PEFT saves a targeted embedding's own base layer: a replacement only if it differs
                e.saved_base.append((tensor, inp.ref))
                continue
            if e.replace is not None:
                raise AdapterHubError(
                    f"{key} is replaced (modules_to_save) by both {e.replace[1]} and {inp.ref}",
                    "two whole-tensor replacements cannot be combined; merge one of them alone",
                )
            if inp.weight != 1:
                report.warn(f"{inp.ref}: {key} is a whole-tensor replacement (modules_to_save); "
                            f"it replaces the base tensor as is, weight {inp.weight:g} does not scale it")
            e.replace = (tensor, inp.ref)
    return edits


class _Hasher:
    """Per-tensor digests on one worker thread, fed the bytes the merge reads anyway."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="fingerprint") if enabled else None
        self.digests: dict[str, str] = {}

    def start(self, info):
        return hashlib.sha256(_tensor_head(info.name, info.dtype, info.shape)) if self.enabled else None

    def update(self, h, view):
        return self.pool.submit(h.update, view) if h is not None else None

    def finish(self, name, h):
        if h is not None:
            self.pool.submit(lambda: self.digests.__setitem__(name, h.hexdigest()))

    def close(self) -> dict[str, str]:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        return self.digests


def _wait(fut) -> None:
    if fut is not None:
        fut.result()


def _stack(deltas: list[tuple[LoraModule, float]], transposed: bool):
    mods = [(m, w) for m, w in deltas if m.transposed == transposed]
    if not mods:
        return None
    a = torch.cat([m.A.to(torch.float32) for m, _ in mods], dim=0)  # (R, in)
    b = torch.cat([m.B.to(torch.float32) * (m.scale * w) for m, w in mods], dim=1)  # (out, R)
    return a, b


class _Buffers:
    """Buffers allocated once (at the largest row block any tensor needs) and reused, two of
    each so reading, arithmetic, hashing and writing overlap; a buffer is reused only after the
    hash and write threads are done with it. Writes go through one writer thread, in order."""

    def __init__(self, max_raw: int, max_block: int, max_out: int, threads: int = 1):
        self.raw = [torch.empty(max(max_raw, 1), dtype=torch.uint8) for _ in range(2)]
        self.raw_views = [memoryview(r.numpy()) for r in self.raw]
        self.f32 = [torch.empty(max(max_block, 1), dtype=torch.float32) for _ in range(2)]
        self.out = [torch.empty(max(max_out, 1), dtype=torch.uint8) for _ in range(2)]
        self.chunks = [bytearray(CHUNK), bytearray(CHUNK)]
        self.pending: dict[str, list[list]] = {"raw": [[], []], "blk": [[], []], "chunk": [[], []]}
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="writer")
        self._wb_file, self._wb_from, self._wb_pending = None, 0, 0
        self.compute_slots = list(range(max(threads, 1) - 1))
        self.compute = ThreadPoolExecutor(threads - 1, thread_name_prefix="matmul") if threads > 1 else None

    def claim(self, kind: str, k: int) -> None:
        for f in self.pending[kind][k]:
            f.result()
        self.pending[kind][k] = []

    def hold(self, kind: str, k: int, fut) -> None:
        if fut is not None:
            self.pending[kind][k].append(fut)

    def write(self, fh, data):
        return self.writer.submit(self._write, fh, data)

    def _write(self, fh, data) -> None:
        """On the writer thread. Every WRITEBACK bytes, start the kernel's writeback of what
        is written so far (fadvise DONTNEED, Linux): the final fsync that makes the output
        durable then finds little left to do, and the output does not crowd the page cache."""
        fd = fh.fileno()
        view = memoryview(data).cast("B")
        for i in range(0, len(view), WRITE_PIECE):  # 256 KiB pieces: one huge write() is slower
            piece = view[i : i + WRITE_PIECE]
            while piece:
                piece = piece[os.write(fd, piece):]
        if self._wb_file is not fh:
            self._wb_file, self._wb_from, self._wb_pending = fh, 0, 0
        self._wb_pending += len(data) if not isinstance(data, memoryview) else data.nbytes
        if self._wb_pending >= WRITEBACK and hasattr(os, "posix_fadvise"):
            pos = os.lseek(fd, 0, os.SEEK_CUR)
            try:
                os.posix_fadvise(fh.fileno(), self._wb_from, pos - self._wb_from, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            self._wb_from, self._wb_pending = pos, 0

    def addmm(self, blk: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float) -> None:
        """blk += alpha · left @ right. With threads > 1, a large stacked rank (real compute) is
        split by rows over our own threads, each op single-threaded: OpenMP's spinning barrier
        is several times slower than one thread when the machine is shared. Measured on a busy
        2-core box, even our split lost to one thread (60-100 vs 20-30 GFLOP/s): default 1."""
        rows = blk.shape[0]
        if left.shape[1] < MATMUL_SPLIT_MIN_RANK or self.compute is None or rows < 2:
            blk.addmm_(left, right, alpha=alpha)
            return
        step = -(-rows // (len(self.compute_slots) + 1))
        futs = [self.compute.submit(blk[i : i + step].addmm_, left[i : i + step], right, alpha=alpha)
                for i in range(step, rows, step)]
        blk[:step].addmm_(left[:step], right, alpha=alpha)
        for f in futs:
            f.result()

    def drain(self, quiet: bool = False) -> None:
        """Wait for every pending hash and write (before a file is closed)."""
        for kind in self.pending:
            for k in (0, 1):
                try:
                    self.claim(kind, k)
                except Exception:
                    if not quiet:
                        raise
                    self.pending[kind][k] = []
        fut = self.writer.submit(lambda: None)
        fut.result()

    def close(self) -> None:
        self.writer.shutdown(wait=True, cancel_futures=True)
        if self.compute is not None:
            self.compute.shutdown(wait=True)


def _block_rows(shape) -> tuple[int, int, int]:
    """(rows, elements per row, rows per block)."""
    shape = list(shape) or [1]
    rows = int(shape[0])
    row = max(1, numel(shape) // max(rows, 1))
    return rows, row, max(1, min(rows, BLOCK_ELEMS // row))


def merge_into_base(base_dir, inputs: list[MergeInput], out, *, dtype: str | None = "auto",
                    max_shard_size: str | int = "5GB", force: bool = False, overwrite: bool = False,
                    recipe: dict | None = None, progress: bool = True, notify=stderr_notify,
                    reader: Reader | None = None, expect_base: str | None = None,
                    threads: int = 1) -> MergeReport:
    """Stream ``base_dir`` into ``out`` with every input's delta added. Returns the report.

    ``recipe`` (from :func:`adapterhub_local.merge.recipe.merge_recipe`) is written as
    recipe.yaml and into the model card; build it with that function for replayable output.
    """
    from .card import merged_model_card
    from .recipe import dump_recipe, merge_recipe

    base_dir = Path(base_dir)
    out = Path(out)
    report = MergeReport(operation="merge", method="linear", output=str(out))
    out_dtype = output_dtype(dtype)
    shard_limit = parse_size(max_shard_size)
    if out.exists() and not overwrite:
        raise AdapterHubError(f"{out}: already exists", "choose another --out, or --overwrite to replace it")
    if out.resolve() == base_dir.resolve():
        raise AdapterHubError(f"{out}: the output cannot be the base model's own folder")

    files, infos = scan_model(base_dir)
    config = _load_config(base_dir)
    has_head = LM_HEAD in infos
    tied = bool(config.get("tie_word_embeddings", not has_head))
    embed_key = _embedding_key(infos, config)
    tied_embed = embed_key if (tied and embed_key and not has_head) else None
    edits = _plan_edits(inputs, infos, tied_embed, report)

    untie = False
    if tied and embed_key:
        touched = {k for k, e in edits.items() if e.deltas or e.replace is not None}
        if touched & {embed_key, LM_HEAD}:
            # PeftModel changes only one side of a tied pair (the other keeps W); write both
            # tensors explicitly and untie, so the merged model computes what PeftModel did.
            untie = True
            report.warn(f"{embed_key} and {LM_HEAD} are tied and an adapter changes "
                        f"{' and '.join(sorted(touched & {embed_key, LM_HEAD}))}: writing both tensors and "
                        "setting tie_word_embeddings=false in config.json", notify)

    # fingerprints: expected from the adapters, found from the cache or from this pass
    expected = {inp.ref: inp.base_fingerprint for inp in inputs}
    for ref, fp in expected.items():
        if not fp:
            report.warn(f"{ref}: base unknown: cannot verify that it was trained on this base "
                        "(no registry record or adapterhub.json with base_fingerprint)", notify)
    if expect_base:  # a replayed recipe names the base it ran on
        expected["recipe base"] = expect_base
    cached = cached_fingerprint(base_dir)
    found = cached.fingerprint if cached else None
    if found:
        _check_fingerprints(expected, found, force, report, notify)

    # the output layout, decided before any data moves
    out_tensors: list[OutTensor] = []
    for name, info in infos.items():
        dt = out_dtype if (out_dtype and info.dtype in FLOAT_ST) else info.dtype
        out_tensors.append(OutTensor(name, dt, list(info.shape), info))
    if untie and not has_head:
        info = infos[embed_key]
        dt = out_dtype if (out_dtype and info.dtype in FLOAT_ST) else info.dtype
        out_tensors.append(OutTensor(LM_HEAD, dt, list(info.shape), info, meta={"virtual": True}))
    shards = plan_shards(out_tensors, shard_limit)
    names = shard_names(len(shards))

    # buffers sized once for the largest tensor that needs arithmetic or a cast
    max_raw = max_block = max_out = 0
    for t in out_tensors:
        e = edits.get(t.name)
        if (e and e.touches()) or t.dtype != t.source.dtype:
            _, row, block = _block_rows(t.shape)
            max_block = max(max_block, block * row)
            max_raw = max(max_raw, block * row * ITEMSIZE[t.source.dtype])
            if t.dtype != "F32":
                max_out = max(max_out, block * row * ITEMSIZE[t.dtype])
    bufs = _Buffers(max_raw, max_block, max_out, threads=max(1, int(threads or 1)))
    # Element-wise passes are memory-bound: one thread does them as fast as two, and on a
    # busy machine OpenMP's barrier makes two threads several times slower. Products of a
    # large stacked rank (many adapters) are split over our own threads (_Buffers.addmm).
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reader = reader or Reader()
    hasher = _Hasher(enabled=found is None)
    stats = {"tensors": len(out_tensors), "modified": 0, "copied": 0, "bytes_written": 0}

    from ..progress import bar

    pbar = bar(total=len(out_tensors), desc="merge", unit="tensor") if progress else None
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            for shard, fname in zip(shards, names):
                with open(tmp / fname, "wb", buffering=0) as fh:
                    try:
                        bufs.write(fh, shard_header(shard))
                        for t in shard:
                            is_base = not t.meta.get("virtual")
                            e = edits.get(t.name)
                            if e is None and t.dtype == t.source.dtype:
                                _copy(t, reader, hasher if is_base else None, fh, bufs)
                                stats["copied"] += 1
                            else:
                                _compute(t, e, reader, hasher if is_base else None, fh, bufs, report, notify)
                                stats["modified"] += 1
                            stats["bytes_written"] += t.nbytes
                            if pbar is not None:
                                pbar.update(1)
                    except BaseException:
                        bufs.drain(quiet=True)  # no thread may touch fh once it is closed
                        raise
                    bufs.drain()
            reader.close()
            digests = hasher.close()
            fp_source = "cache"
            if found is None:
                found = combine(digests)
                fp_source = "computed while streaming"
                _check_fingerprints(expected, found, force, report, notify)
                _store(base_dir, found, digests, infos, config)
            report.fingerprint = {"base": found, "source": fp_source,
                                  "expected": dict(expected),
                                  "verified": all(v == found for v in expected.values() if v),
                                  "unknown": [k for k, v in expected.items() if not v]}
            (tmp / INDEX_NAME).write_text(index_json(shards, names), encoding="utf-8")
            for side in side_files(base_dir):
                if side.name == "config.json":
                    continue
                shutil.copyfile(side, tmp / side.name)
            if config:
                new_cfg = dict(config)
                if untie:
                    new_cfg["tie_word_embeddings"] = False
                if out_dtype:
                    tname = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[out_dtype]
                    for key in ("dtype", "torch_dtype"):
                        if key in new_cfg:
                            new_cfg[key] = tname
                    if "dtype" not in new_cfg and "torch_dtype" not in new_cfg:
                        new_cfg["dtype"] = tname
                (tmp / "config.json").write_text(json.dumps(new_cfg, indent=2, sort_keys=True) + "\n",
                                                 encoding="utf-8")
            if recipe is None:
                recipe = merge_recipe(base_dir, inputs, dtype=dtype, max_shard_size=max_shard_size,
                                      force=force, base_fingerprint=found)
            report.recipe = recipe
            (tmp / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
            (tmp / "README.md").write_text(
                merged_model_card(config, base_dir, inputs, recipe, report.warnings, found), encoding="utf-8")
    finally:
        if pbar is not None:
            pbar.close()
        bufs.close()
        torch.set_num_threads(saved_threads)
        reader.close()
        if hasher.pool is not None:
            hasher.pool.shutdown(wait=True)

    report.inputs = [{"ref": i.ref, "weight": i.weight, "path": str(i.folder),
                      "base_fingerprint": i.base_fingerprint, "modules": len(i.adapter.modules),
                      "ranks": i.adapter.ranks} for i in inputs]
    report.modules = _module_rows(inputs)
    report.summary = {**stats, "shards": len(shards), "untied": untie,
                      "max_tensors_in_memory": reader.max_live, "dtype": out_dtype or "auto",
                      "exact": True}
    return report.finish()


def _check_fingerprints(expected: dict, found: str, force: bool, report: MergeReport, notify) -> None:
    for ref, fp in expected.items():
        if fp and fp != found:
            if not force:
                raise BaseMismatch(fp, found, what=f"{ref}: base model")
            report.warn(f"--force: {ref} expects base {fp} but this base is {found}; merged anyway", notify)


def _store(base_dir: Path, found: str, digests: dict, infos, config: dict) -> None:
    """Cache the fingerprint we just computed, so the next look at this base is free."""
    fp = Fingerprint(fingerprint=found, tensors=dict(digests), num_tensors=len(digests))
    for info in infos.values():
        n = numel(info.shape)
        fp.num_parameters += n
        fp.dtypes[info.dtype] = fp.dtypes.get(info.dtype, 0) + n
        fp.total_bytes += info.end - info.start
    archs = config.get("architectures") or [None]
    fp.architecture, fp.model_type = archs[0], config.get("model_type")
    fp.name_or_path = config.get("_name_or_path") or str(Path(base_dir).resolve())
    assert found.startswith(FP_PREFIX)
    store_fingerprint(base_dir, fp)


def _copy(t: OutTensor, reader: Reader, hasher: _Hasher | None, fh, bufs: _Buffers) -> None:
    info = t.source
    reader.begin(info)
    h = hasher.start(info) if hasher else None
    size = info.end - info.start
    pos = 0
    k = 0
    while pos < size:
        n = min(CHUNK, size - pos)
        bufs.claim("chunk", k)  # the hash and write threads may still read this buffer
        view = memoryview(bufs.chunks[k])[:n]
        reader.read_into(info, view, pos)
        if hasher:
            bufs.hold("chunk", k, hasher.update(h, view))
        bufs.hold("chunk", k, bufs.write(fh, view))
        pos += n
        k ^= 1
    if hasher:
        hasher.finish(info.name, h)
    reader.end(info)


def _replacement(t: OutTensor, e: _Edit, reader: Reader, bufs: _Buffers, report: MergeReport, notify):
    """The tensor that replaces the base one, if any. A saved copy of a target's own base
    layer counts only when it differs from the base (checked block by block, before any write)."""
    replacement = e.replace[0] if e.replace is not None else None
    if not e.saved_base:
        return replacement
    info = t.source
    rows, row, block = _block_rows(info.shape)
    item = ITEMSIZE[info.dtype]
    for saved, label in e.saved_base:
        flat = saved.reshape(rows, row)
        same = True
        for r0 in range(0, rows, block):
            r1 = min(rows, r0 + block)
            bufs.claim("raw", 0)
            nbytes = (r1 - r0) * row * item
            reader.read_into(info, bufs.raw_views[0][:nbytes], r0 * row * item)
            src = bufs.raw[0][:nbytes].view(ST_TO_TORCH[info.dtype]).view(r1 - r0, row)
            if not torch.equal(flat[r0:r1].to(torch.float32), src.to(torch.float32)):
                same = False
                break
        if same:
            continue
        if replacement is not None:
            raise AdapterHubError(f"{t.name} is replaced by more than one adapter ({label} among them)",
                                  "merge them one at a time")
        report.warn(f"{label}: its saved copy of {t.name} differs from the base; using the saved copy", notify)
        replacement = saved
    return replacement


def _factors(deltas: list[tuple[LoraModule, float]], transposed: bool):
    """(A (R, in), B (out, R), alpha) for one addmm_; one adapter needs no copy at all."""
    mods = [(m, w) for m, w in deltas if m.transposed == transposed]
    if not mods:
        return None
    if len(mods) == 1:
        m, w = mods[0]
        return m.A.to(torch.float32), m.B.to(torch.float32), m.scale * w
    a, b = _stack(mods, transposed)
    return a, b, 1.0


def _compute(t: OutTensor, e: _Edit | None, reader: Reader, hasher: _Hasher | None, fh, bufs: _Buffers,
             report: MergeReport, notify) -> None:
    info = t.source
    e = e or _Edit()
    rows, row, block = _block_rows(info.shape)
    replacement = _replacement(t, e, reader, bufs, report, notify)
    if replacement is not None:
        replacement = replacement.reshape(rows, row)
    plain = _factors(e.deltas, transposed=False)
    trans = _factors(e.deltas, transposed=True)
    bias = None
    if e.bias:
        bias = sum(m.bias.to(torch.float32) * (m.scale * w) for m, w in e.bias).view(rows, row)

    src_t, out_t = ST_TO_TORCH[info.dtype], ST_TO_TORCH[t.dtype]
    src_item, out_item = ITEMSIZE[info.dtype], ITEMSIZE[t.dtype]
    reader.begin(info)
    h = hasher.start(info) if hasher else None
    k = 0
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        n = (r1 - r0) * row
        bufs.claim("raw", k)  # the hash thread may still read this buffer
        bufs.claim("blk", k)  # the writer may still read this block
        view = bufs.raw_views[k][: n * src_item]
        reader.read_into(info, view, r0 * row * src_item)
        if hasher:
            bufs.hold("raw", k, hasher.update(h, view))
        blk = bufs.f32[k][:n].view(r1 - r0, row)
        blk.copy_(replacement[r0:r1] if replacement is not None
                  else bufs.raw[k][: n * src_item].view(src_t).view(r1 - r0, row))
        if plain is not None:
            a, b, alpha = plain
            bufs.addmm(blk, b[r0:r1], a, alpha)  # rows of W are output features
        if trans is not None:
            a, b, alpha = trans
            bufs.addmm(blk, a[:, r0:r1].T, b.T, alpha)  # W stored (in, out): rows are input features
        if bias is not None:
            blk.add_(bias[r0:r1])
        if out_t == torch.float32:
            data = blk
        else:
            data = bufs.out[k][: n * out_item].view(out_t).view(r1 - r0, row)
            data.copy_(blk)  # the one cast
            if out_t == torch.float16 and not bool(torch.isfinite(data).all()):
                raise AdapterHubError(f"{t.name}: the merged tensor overflows float16",
                                      "use --dtype bfloat16 or float32, or smaller weights")
        bufs.hold("blk", k, bufs.write(fh, data.reshape(-1).view(torch.uint8).numpy()))
        k ^= 1
    if hasher:
        hasher.finish(info.name, h)
    reader.end(info)


def _norm(m: LoraModule) -> float:
    """‖s·B·A‖_F from r×r products (float32: this is a report figure, not the merge)."""
    a, b = m.A.to(torch.float32), m.B.to(torch.float32)
    return abs(m.scale) * float(torch.sum((a @ a.T) * (b.T @ b)).clamp_min(0)) ** 0.5


def _module_rows(inputs: list[MergeInput]) -> list[dict]:
    rows: dict[str, dict] = {}
    for inp in inputs:
        for name, m in inp.adapter.modules.items():
            r = rows.setdefault(name, {"module": name, "norms": {}, "ranks": {}})
            r["norms"][inp.ref] = abs(inp.weight) * _norm(m)
            r["ranks"][inp.ref] = m.rank
        for key in inp.adapter.extra:
            r = rows.setdefault(key, {"module": key, "norms": {}, "ranks": {}})
            r.setdefault("replaced_by", []).append(inp.ref)
    return [rows[k] for k in sorted(rows)]
