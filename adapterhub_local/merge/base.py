"""Merge adapters into a base model, streaming: W' = W + Σ wᵢ·sᵢ·BᵢAᵢ.

One pass over the base, shard by shard, tensor by tensor (stream.py has the details):

* an untouched tensor is copied by the kernel (or from the mapped shard when it is hashed);
* a touched tensor goes in row blocks straight from the mapped shard: every adapter's
  factors for that module are applied as ONE float32 product (the factors of all
  adapters concatenated along the rank), added and cast once to the output dtype in
  one fused pass, and written by a writer thread while the next block is computed.
  Memory is a few MiB of buffers plus the adapters, whatever the model.

The base fingerprint is verified on the way: each tensor's digest is computed
from the bytes already read, on hashing threads that overlap the arithmetic;
when the base's cached fingerprint is still valid (same files, sizes, mtimes)
it is reused and nothing is hashed. The output directory is a temp dir renamed
into place only after every byte is written and the fingerprint matched.

This module must not import transformers (6-8 s of start-up for nothing), nor torch
(1-1.5 s): numpy does the arithmetic, bfloat16 travels as uint16 bits.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
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
from .plan import LM_HEAD, embedding_key, load_config, plan_edits
from .report import MergeReport, stderr_notify
from .stream import (
    LOWRANK_SPLIT,
    Hasher,
    Pipeline,
    block_rows,
    compute_tensor,
    copy_tensor,
)


def merge_into_base(base_dir, inputs: list[MergeInput], out, *, dtype: str | None = "auto",
                    max_shard_size: str | int = "5GB", force: bool = False, overwrite: bool = False,
                    recipe: dict | None = None, progress: bool = True, notify=stderr_notify,
                    reader: Reader | None = None, expect_base: str | None = None) -> MergeReport:
    """Stream ``base_dir`` into ``out`` with every input's delta added. Returns the report.

    ``recipe`` (from :func:`adapterhub_local.merge.recipe.merge_recipe`) is written as
    recipe.yaml and into the model card; build it with that function for replayable output.
    """
    from ..card import merged_model_card
    from .recipe import dump_recipe, merge_recipe

    base_dir = Path(base_dir)
    out = Path(out)
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
    max_out = max_delta = 0
    for t in out_tensors:
        e = edits.get(t.name)
        if (e and e.touches()) or t.dtype != t.source.dtype:
            _, row, block = block_rows(t.shape)
            max_out = max(max_out, block * row * max(4, ITEMSIZE.get(t.dtype, 4)))
            max_delta = max(max_delta, block * row)
    reader = reader or Reader()
    # Stacked adapters (rank > 64) make the products real compute: one compute thread per core,
    # whole blocks each. At rank 16 the main thread alone keeps up with the writer and hasher.
    ranks = [sum(m.rank for m, _ in e.deltas) for e in edits.values() if e.deltas]
    workers = stream.cores() if max(ranks, default=0) > LOWRANK_SPLIT else 0
    pipe = Pipeline(reader, max_out, max_delta, workers=workers if workers > 1 else 0)
    hasher = Hasher(enabled=found is None)
    stats = {"tensors": len(out_tensors), "modified": 0, "copied": 0, "bytes_written": 0}

    from ..progress import bar

    pbar = bar(total=len(out_tensors), desc="merge", unit="tensor") if progress else None
    with_products = [t.name for t in out_tensors if edits.get(t.name) and edits[t.name].deltas]
    upcoming = {name: with_products[i + 1 : i + 2] for i, name in enumerate(with_products)}
    failed = True
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            for shard, fname in zip(shards, names):
                with open(tmp / fname, "wb", buffering=0) as fh:
                    try:
                        header = shard_header(shard)
                        pipe.data_start = len(header)
                        pipe.track(pipe.write(fh, header))
                        for t in shard:
                            is_base = not t.meta.get("virtual")
                            e = edits.get(t.name)
                            if e is None and t.dtype == t.source.dtype:
                                copy_tensor(t, reader, hasher if is_base else None, fh, pipe)
                                stats["copied"] += 1
                            else:
                                if t.name in upcoming:  # the factors of this tensor and the next
                                    pipe.prepare_ahead([t.name, *upcoming[t.name]], edits)
                                compute_tensor(t, e, reader, hasher if is_base else None, fh, pipe, report,
                                               notify, prepared=pipe.prepared.pop(t.name, None))
                                stats["modified"] += 1
                            stats["bytes_written"] += t.nbytes
                            if pbar is not None:
                                pbar.update(1)
                    except BaseException:
                        pipe.close(error=True)  # no thread may touch fh once it is closed
                        hasher.abort()
                        raise
                    pipe.drain()
            pipe.close()
            digests = hasher.close()
            # the report's per-module norms (0.1 s for eight adapters), while the files are fsynced
            side = ThreadPoolExecutor(1, thread_name_prefix="merge-report")
            rows = side.submit(_module_rows, inputs)
            side.shutdown(wait=False)  # the thread ends with its one task
            reader.close()
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
                if side.name == "config.json" and (untie or out_dtype):
                    continue  # rewritten below
                shutil.copyfile(side, tmp / side.name)
            if config and (untie or out_dtype):
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
            recipe_text = dump_recipe(recipe)
            (tmp / "recipe.yaml").write_text(recipe_text, encoding="utf-8")
            (tmp / "README.md").write_text(
                merged_model_card(config, base_dir, inputs, recipe_text, report.warnings, found), encoding="utf-8")
        failed = False
    except OSError as e:  # disk full, permissions: the temp dir is gone, say why in one line
        if e.filename and str(e.filename).startswith(str(base_dir)):
            raise AdapterHubError(f"{e.filename}: cannot read ({e.strerror})") from None
        raise AdapterHubError(f"{out}: cannot write the merged model ({e.strerror or e})",
                              "check free space and permissions; nothing was left behind") from None
    finally:
        if pbar is not None:
            pbar.close()
        pipe.close(error=failed)
        hasher.abort()
        reader.close()

    report.inputs = [{"ref": i.ref, "weight": i.weight, "path": str(i.folder),
                      "base_fingerprint": i.base_fingerprint, "modules": len(i.adapter.modules),
                      "ranks": i.adapter.ranks} for i in inputs]
    report.modules = rows.result()
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
