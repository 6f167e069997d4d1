"""Merge adapters into a base model, streaming: W' = W + Σ wᵢ·sᵢ·BᵢAᵢ.

Three phases over one small state object (:class:`MergeState`):

* :func:`plan` decides everything before any data moves: which output tensor gets which
  deltas (plan.py), the tied embedding pair, the expected fingerprints, the output
  layout and shards, the buffer sizes;
* :func:`stream_tensors` makes one pass over the base, shard by shard, tensor by tensor
  (stream.py has the threads): an untouched tensor is copied by the kernel; a touched
  one goes in row blocks straight from the mapped shard, every adapter's factors for
  that module applied as ONE float32 product, added and cast once to the output dtype,
  and written while the next block is computed. Memory is a few MiB of buffers plus the
  adapters, whatever the model. Per tensor, :func:`_stream_one` picks the step;
* :func:`finalize` checks the fingerprint found on the way, writes the index, side
  files, config, recipe and card, and fills the report.

The base fingerprint is verified on the way: each tensor's digest is computed from the
bytes already read, on hashing threads that overlap the arithmetic; when the base's
cached fingerprint is still valid (same files, sizes, mtimes) it is reused and nothing
is hashed. The output directory is a temp dir renamed into place only after every byte
is written and the fingerprint matched.

This module must not import transformers (6-8 s of start-up for nothing), nor torch
(1-1.5 s): numpy does the arithmetic, bfloat16 travels as uint16 bits.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AdapterHubError, BaseMismatch
from ..fingerprint import FP_PREFIX, Fingerprint, cached_fingerprint, combine, store_fingerprint
from ..fsutil import atomic_dir, check_output
from . import stream
from .inputs import MergeInput
from .io import (
    FLOAT_ST,
    INDEX_NAME,
    ITEMSIZE,
    OutTensor,
    Reader,
    index_json,
    numel,
    output_dtype,
    parse_size,
    plan_shards,
    scan_model,
    shard_header,
    shard_names,
    side_files,
)
from .plan import LM_HEAD, Edit, embedding_key, load_config, plan_edits
from .report import MergeReport, stderr_notify
from .stream import LOWRANK_SPLIT, Hasher, Pipeline, block_rows, compute_tensor, copy_tensor


@dataclass
class MergeState:
    """What the phases share. ``plan`` fills the first block; the others add to it."""

    base_dir: Path
    out: Path
    inputs: list[MergeInput]
    report: MergeReport
    notify: Callable | None
    config: dict
    infos: dict
    edits: dict[str, Edit]
    out_dtype: str | None
    untie: bool
    expected: dict[str, str | None]  # input label -> the base fingerprint it expects
    found: str | None  # the base's fingerprint: cached, or computed while streaming
    shards: list[list[OutTensor]]
    names: list[str]
    max_out: int  # bytes of the largest output block
    max_delta: int  # elements of the largest delta block
    workers: int  # compute threads (0: the main thread computes)
    stats: dict = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)  # tensor digests hashed on the way
    max_live: int = 0


def merge_into_base(base_dir, inputs: list[MergeInput], out, *, dtype: str | None = "auto",
                    max_shard_size: str | int = "5GB", force: bool = False, overwrite: bool = False,
                    recipe: dict | None = None, progress: bool = True, notify=stderr_notify,
                    reader: Reader | None = None, expect_base: str | None = None) -> MergeReport:
    """Stream ``base_dir`` into ``out`` with every input's delta added. Returns the report.

    ``recipe`` (from :func:`adapterhub_local.merge.recipe.merge_recipe`) is written as
    recipe.yaml and into the model card; build it with that function for replayable output.
    """
    st = plan(base_dir, inputs, out, dtype=dtype, max_shard_size=max_shard_size, force=force,
              overwrite=overwrite, notify=notify, expect_base=expect_base)
    reader = reader or Reader()
    try:
        with atomic_dir(st.out, overwrite=overwrite) as tmp:
            stream_tensors(st, tmp, reader, progress)
            reader.close()  # the base's mappings: nothing reads them any more
            rows = _report_rows_later(inputs)  # while the files are fsynced
            finalize(st, tmp, recipe, force=force, dtype=dtype, max_shard_size=max_shard_size)
    except OSError as e:  # disk full, permissions: the temp dir is gone, say why in one line
        if e.filename and str(e.filename).startswith(str(st.base_dir)):
            raise AdapterHubError(f"{e.filename}: cannot read ({e.strerror})") from None
        raise AdapterHubError(f"{st.out}: cannot write the merged model ({e.strerror or e})",
                              "check free space and permissions; nothing was left behind") from None
    finally:
        reader.close()
    st.report.modules = rows.result()
    return st.report.finish()


# ---- phase 1: plan ---------------------------------------------------------------------------

def plan(base_dir, inputs: list[MergeInput], out, *, dtype, max_shard_size, force: bool,
         overwrite: bool, notify, expect_base: str | None) -> MergeState:
    """Everything decided before any data moves; refuses bad inputs before any output exists."""
    base_dir, out = Path(base_dir), Path(out)
    report = MergeReport(operation="merge", method="linear", output=str(out))
    out_dtype = output_dtype(dtype)
    shard_limit = parse_size(max_shard_size)
    check_output(out, [base_dir, *(i.folder for i in inputs)])  # never an input, inside or above one
    if out.exists() and not overwrite:
        raise AdapterHubError(f"{out}: already exists", "choose another --out, or --overwrite to replace it")

    _, infos = scan_model(base_dir)
    config = load_config(base_dir)
    has_head = LM_HEAD in infos
    tied = bool(config.get("tie_word_embeddings", not has_head))
    embed_key = embedding_key(infos, config)
    tied_embed = embed_key if (tied and embed_key and not has_head) else None
    edits = plan_edits(inputs, infos, tied_embed, report)

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

    # fingerprints: expected from the adapters, found from the cache or from the stream
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

    # the output layout
    out_tensors: list[OutTensor] = []
    for name, info in infos.items():
        dt = out_dtype if (out_dtype and info.dtype in FLOAT_ST) else info.dtype
        out_tensors.append(OutTensor(name, dt, list(info.shape), info))
    if untie and not has_head:
        info = infos[embed_key]
        dt = out_dtype if (out_dtype and info.dtype in FLOAT_ST) else info.dtype
        out_tensors.append(OutTensor(LM_HEAD, dt, list(info.shape), info, meta={"virtual": True}))
    shards = plan_shards(out_tensors, shard_limit)

    # buffers sized once for the largest tensor that needs arithmetic or a cast
    max_out = max_delta = 0
    for t in out_tensors:
        e = edits.get(t.name)
        if (e and e.touches()) or t.dtype != t.source.dtype:
            _, row, block = block_rows(t.shape)
            max_out = max(max_out, block * row * max(4, ITEMSIZE.get(t.dtype, 4)))
            max_delta = max(max_delta, block * row)
    # Stacked adapters (rank > 64) make the products real compute: one compute thread per core,
    # whole blocks each. At rank 16 the main thread alone keeps up with the writer and hasher.
    ranks = [sum(m.rank for m, _ in e.deltas) for e in edits.values() if e.deltas]
    workers = stream.cores() if max(ranks, default=0) > LOWRANK_SPLIT else 0
    return MergeState(base_dir=base_dir, out=out, inputs=inputs, report=report, notify=notify, config=config,
                      infos=infos, edits=edits, out_dtype=out_dtype, untie=untie, expected=expected,
                      found=found, shards=shards, names=shard_names(len(shards)), max_out=max_out,
                      max_delta=max_delta, workers=workers if workers > 1 else 0,
                      stats={"tensors": len(out_tensors), "modified": 0, "copied": 0, "bytes_written": 0})


# ---- phase 2: stream -------------------------------------------------------------------------

def stream_tensors(st: MergeState, tmp: Path, reader: Reader, progress: bool) -> None:
    """One ordered pass: every shard of the output written into ``tmp``, the base hashed on the
    way when its fingerprint is not cached. No thread outlives this call."""
    from ..progress import bar

    pipe = Pipeline(reader, st.max_out, st.max_delta, workers=st.workers)
    hasher = Hasher(enabled=st.found is None)
    pbar = bar(total=st.stats["tensors"], desc="merge", unit="tensor") if progress else None
    # the factors of each tensor with a product are prepared one tensor ahead, on a helper thread
    with_products = [t.name for shard in st.shards for t in shard if st.edits.get(t.name)
                     and st.edits[t.name].deltas]
    upcoming = {name: with_products[i + 1 : i + 2] for i, name in enumerate(with_products)}
    failed = True
    try:
        for shard, fname in zip(st.shards, st.names):
            with open(tmp / fname, "wb", buffering=0) as fh:
                try:
                    header = shard_header(shard)
                    pipe.data_start = len(header)
                    pipe.track(pipe.write(fh, header))
                    for t in shard:
                        _stream_one(st, t, reader, hasher, fh, pipe, upcoming)
                        if pbar is not None:
                            pbar.update(1)
                except BaseException:
                    pipe.close(error=True)  # no thread may touch fh once it is closed
                    hasher.abort()
                    raise
                pipe.drain()
        pipe.close()
        st.digests = hasher.close()
        failed = False
    finally:
        if pbar is not None:
            pbar.close()
        pipe.close(error=failed)
        hasher.abort()
        st.max_live = reader.max_live


def _stream_one(st: MergeState, t: OutTensor, reader: Reader, hasher: Hasher, fh, pipe: Pipeline,
                upcoming: dict[str, list[str]]) -> None:
    """The step for one output tensor: a copy, or W' = W + Σ wᵢsᵢBᵢAᵢ block by block. A
    per-tensor variant of the update (DoRA's row norms, say) is one more branch here."""
    hashed = hasher if not t.meta.get("virtual") else None  # the untied lm_head is not a base tensor
    e = st.edits.get(t.name)
    if e is None and t.dtype == t.source.dtype:
        copy_tensor(t, reader, hashed, fh, pipe)
        st.stats["copied"] += 1
    else:
        if t.name in upcoming:  # the factors of this tensor and the next
            pipe.prepare_ahead([t.name, *upcoming[t.name]], st.edits)
        compute_tensor(t, e, reader, hashed, fh, pipe, st.report, st.notify,
                       prepared=pipe.prepared.pop(t.name, None))
        st.stats["modified"] += 1
    st.stats["bytes_written"] += t.nbytes


# ---- phase 3: finalize -----------------------------------------------------------------------

def finalize(st: MergeState, tmp: Path, recipe: dict | None, *, force: bool, dtype, max_shard_size) -> None:
    """Check the fingerprint found on the way, then the index, side files, config, recipe, card."""
    from ..card import merged_model_card
    from .recipe import dump_recipe, merge_recipe

    report = st.report
    fp_source = "cache"
    if st.found is None:
        st.found = combine(st.digests)
        fp_source = "computed while streaming"
        _check_fingerprints(st.expected, st.found, force, report, st.notify)
        _store(st.base_dir, st.found, st.digests, st.infos, st.config)
    report.fingerprint = {"base": st.found, "source": fp_source, "expected": dict(st.expected),
                          "verified": all(v == st.found for v in st.expected.values() if v),
                          "unknown": [k for k, v in st.expected.items() if not v]}
    (tmp / INDEX_NAME).write_text(index_json(st.shards, st.names), encoding="utf-8")
    rewrite_config = bool(st.config) and (st.untie or bool(st.out_dtype))
    for side in side_files(st.base_dir):
        if side.name == "config.json" and (st.untie or st.out_dtype):
            continue  # rewritten below
        shutil.copyfile(side, tmp / side.name)
    if rewrite_config:
        (tmp / "config.json").write_text(json.dumps(_new_config(st), indent=2, sort_keys=True) + "\n",
                                         encoding="utf-8")
    if recipe is None:
        recipe = merge_recipe(st.base_dir, st.inputs, dtype=dtype, max_shard_size=max_shard_size,
                              force=force, base_fingerprint=st.found)
    report.recipe = recipe
    recipe_text = dump_recipe(recipe)
    (tmp / "recipe.yaml").write_text(recipe_text, encoding="utf-8")
    (tmp / "README.md").write_text(
        merged_model_card(st.config, st.base_dir, st.inputs, recipe_text, report.warnings, st.found),
        encoding="utf-8")
    report.inputs = [{"ref": i.ref, "weight": i.weight, "path": str(i.folder),
                      "base_fingerprint": i.base_fingerprint, "modules": len(i.adapter.modules),
                      "ranks": i.adapter.ranks} for i in st.inputs]
    report.summary = {**st.stats, "shards": len(st.shards), "untied": st.untie,
                      "max_tensors_in_memory": st.max_live, "dtype": st.out_dtype or "auto",
                      "exact": True}


def _new_config(st: MergeState) -> dict:
    new_cfg = dict(st.config)
    if st.untie:
        new_cfg["tie_word_embeddings"] = False
    if st.out_dtype:
        tname = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[st.out_dtype]
        for key in ("dtype", "torch_dtype"):
            if key in new_cfg:
                new_cfg[key] = tname
        if "dtype" not in new_cfg and "torch_dtype" not in new_cfg:
            new_cfg["dtype"] = tname
    return new_cfg


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


def _report_rows_later(inputs: list[MergeInput]) -> Future:
    """The report's per-module norms (0.2 s for eight adapters), on a thread of their own."""
    side = ThreadPoolExecutor(1, thread_name_prefix="merge-report")
    rows = side.submit(_module_rows, inputs)
    side.shutdown(wait=False)  # the thread ends with its one task
    return rows


def _module_rows(inputs: list[MergeInput]) -> list[dict]:
    rows: dict[str, dict] = {}
    for inp in inputs:
        for name, m in inp.adapter.modules.items():
            r = rows.setdefault(name, {"module": name, "norms": {}, "ranks": {}})
            r["norms"][inp.ref] = abs(inp.weight) * m.delta_norm()
            r["ranks"][inp.ref] = m.rank
        for key in inp.adapter.extra:
            r = rows.setdefault(key, {"module": key, "norms": {}, "ranks": {}})
            r.setdefault("replaced_by", []).append(inp.ref)
    return [rows[k] for k in sorted(rows)]
