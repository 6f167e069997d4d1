"""The streaming pipeline of a merge into a base: map, hash, compute, write. No torch.

A touched tensor goes row block by row block (BLOCK_ELEMS elements):

* the base block is a read-only view of the mapped shard (no copy into a buffer);
* every adapter's factors for the module are stacked along the rank, the weights and
  scalings folded into B, so the whole delta is ONE float32 product;
* one fused pass in C (``cast.lowrank_add_cast``) computes that product, adds it to the
  base values in float32 and rounds once to the output dtype; high-rank products (many
  stacked adapters) run whole blocks on a pool of compute threads, one per core, fed
  from one ordered queue that runs on across tensors (no drain at a tensor's end);
* the result goes to the writer thread, which writes 256 KiB pieces and starts the
  kernel's writeback as it goes, so I/O overlaps the arithmetic.

Rare cases (bias deltas, a cast alone, MoE expert slices of a fused 3-D tensor) use numpy
for the delta and ``cast.add_cast``.
Hashing (when the base's fingerprint is not cached) runs on hashing threads over the
same mapped views. A mapped range is dropped from our address space once the hash and
the write that read it are done, so memory stays at a few blocks whatever the model.
Untouched tensors are copied by the kernel (copy_file_range) straight to their offsets
on a copy thread, at once, the ordered writes stepping over them; or, when they must be
hashed, written in order straight from the mapping.

Threads and invariants
----------------------
* The main thread (the caller of ``copy_tensor`` / ``compute_tensor``) owns all of the
  Pipeline's bookkeeping: the ordered queue (``queue``, ``in_flight``), the output slot
  ring (``slot``, ``reserved``, ``busy``), the held mapped ranges (``held``) and the
  Reader. Only it submits writes, and it submits them in output order: a block's
  ``finish`` runs in ``settle``, on the main thread, strictly in queue order, even when
  the compute threads finish blocks out of order.
* One writer thread is the single ordered writer: it runs ``_write`` and ``_skip`` in
  submission order, so the file position advances tensor by tensor exactly as the shard
  header lays them out. Nothing else moves the file position.
* One copy thread writes untouched tensors with copy_file_range / pwrite at explicit
  offsets, which never move the file position; the writer ``_skip``s over exactly those
  ranges. Writes at explicit offsets into byte ranges no other thread writes are safe on
  a shared descriptor (POSIX: pwrite leaves the offset alone; the file is not O_APPEND).
* Compute threads (high ranks only) each fill one reserved output slot from read-only
  mapped views and read-only factors; a slot is not handed out again until its block is
  finished (``reserved``) and the writer is done with it (``busy``).
* The prepare thread builds a tensor's stacked factors one tensor ahead; its results are
  new arrays, read by the main thread only after ``result()``.
* Hashing threads (one pool per core) get a tensor's updates on one pool, in order; a
  mapped range is released (on the main thread) only after its write and hash are done.
* Failure: any thread that fails sets ``failed``, which only ever goes from false to
  true (``close(error=True)`` sets it too); once set, queued writes and copies return
  at once, so nothing touches a file after it is closed. The error itself reaches the
  main thread through its Future (``settle``, ``next_slot``, ``drain``), which raises it;
  the caller then closes the pipeline with ``error=True`` (pending work cancelled) and
  the output's temp dir is removed.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..errors import AdapterHubError
from ..fingerprint import tensor_head
from ..lora import LoraModule, stack_factors
from .cast import KINDS, ROWS, TILE, add_cast, lowrank_add_cast, to_f32
from .dora import DoraTensor, has_dora
from .io import ITEMSIZE, OutTensor, Reader, numel
from .plan import Edit
from .report import MergeReport

CHUNK = 8 * 1024 * 1024  # copy / hash granularity for untouched tensors
WRITE_PIECE = 256 * 1024
WRITEBACK = 16 * 1024 * 1024  # start writeback of the output every 16 MiB (x8: 0.05 s less than 64)
BLOCK_ELEMS = 1024 * 1024  # elements per row block: one write, one hash update
LOWRANK_SPLIT = 64  # above this (stacked) rank, blocks are computed on every core
HELD_BYTES = 64 * 1024 * 1024  # mapped bytes waiting for a hash or a write, at most
SLOTS = 4  # output buffers in flight (more when more compute threads hold blocks)
DEPTH = 4  # blocks queued per compute thread (2: 2.19-2.36 s for x8, 4: 2.11-2.15, 8: same as 4)


def cores() -> int:
    """CPUs this process may run on (affinity, containers), at most 8: threads beyond that
    would only add buffers."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


class Hasher:
    """Per-tensor digests on worker threads, fed the bytes the merge reads anyway.

    One worker per core: a tensor's updates all go to one worker, in order; tensors take
    turns, so when the arithmetic leaves a core idle, hashing (the slowest part of a cold
    merge, ~1.2 GB/s per core) uses it."""

    def __init__(self, enabled: bool, workers: int | None = None):
        self.enabled = enabled
        n = max(1, workers or cores()) if enabled else 0
        self.pools = [ThreadPoolExecutor(1, thread_name_prefix="fingerprint") for _ in range(n)]
        self.turn = 0
        self.digests: dict[str, str] = {}

    def start(self, info):
        if not self.enabled:
            return None
        self.turn = (self.turn + 1) % len(self.pools)
        return (hashlib.sha256(tensor_head(info.name, info.dtype, info.shape)), self.pools[self.turn])

    def update(self, h, view):
        return h[1].submit(h[0].update, view) if h is not None else None

    def finish(self, name, h):
        if h is not None:
            h[1].submit(lambda: self.digests.__setitem__(name, h[0].hexdigest()))

    def close(self) -> dict[str, str]:
        for pool in self.pools:
            pool.shutdown(wait=True)
        return self.digests

    def abort(self) -> None:
        for pool in self.pools:
            pool.shutdown(wait=True, cancel_futures=True)


class Pipeline:
    """Ordered writes on one writer thread, reusable output buffers, and the release of
    mapped ranges once every thread that reads them is done."""

    def __init__(self, reader: Reader, max_out: int, max_delta: int, workers: int = 0):
        self.reader = reader
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="merge-writer")
        # untouched tensors are copied by the kernel straight to their place in the output, on
        # their own thread, at once: a 131 MB embedding copy never holds up the ordered writes
        self.copier = ThreadPoolExecutor(1, thread_name_prefix="merge-copy")
        self.data_start = 0  # where the current shard's tensor data begins (after its header)
        # compute threads for high-rank products: whole blocks in flight on every core (the C
        # kernel releases the GIL), so a core that falls behind never stalls the other
        self.compute = ThreadPoolExecutor(workers, thread_name_prefix="merge-compute") if workers else None
        self.workers = workers
        # blocks handed to the compute threads, finished strictly in order; DEPTH per thread so a
        # thread that finishes a block takes the next one at once, without waiting for the main
        # thread, and the queue runs on across tensors (no drain at each tensor's end)
        self.depth = DEPTH * workers if workers else 1
        self.queue: collections.deque = collections.deque()  # (result or Future, then(result))
        self.in_flight = 0  # Futures in the queue
        self.prep = ThreadPoolExecutor(1, thread_name_prefix="merge-prepare")
        self.prepared: dict[str, Future] = {}  # tensor name -> prepare(edit), a tensor ahead
        # a block in a compute thread holds its slot until finished; two more go to the writer
        self.out = [np.empty(max(max_out, 1), dtype=np.uint8) for _ in range(max(SLOTS, self.depth + 2))]
        self.delta = np.empty(max(max_delta, 1), dtype=np.float32)
        self.busy: list[list[Future]] = [[] for _ in self.out]
        self.reserved: set[int] = set()  # slots of blocks not yet finished
        self.slot = 0
        self.held: collections.deque = collections.deque()  # (futures, info, offset, nbytes)
        self.held_bytes = 0
        self.other: list[Future] = []  # kernel copies: only their errors matter
        self.failed = False
        self._wb_file, self._wb_from, self._wb_pending = None, 0, 0
        self.kernel_copy = hasattr(os, "copy_file_range")

    # --- the compute thread's side
    def prepare_ahead(self, names: list[str], edits: dict) -> None:
        for name in names:
            if name not in self.prepared:
                self.prepared[name] = self.prep.submit(prepare, edits[name])

    def then(self, result, fn) -> None:
        """Run ``fn(result)`` after everything queued before it (at once if nothing is queued).
        ``result`` may be a Future: then ``fn`` gets its result, once it is done."""
        if isinstance(result, Future):
            self.in_flight += 1
        elif not self.queue:
            fn(result)
            return
        self.queue.append((result, fn))

    def settle(self, limit: int) -> None:
        """Finish queued work, in order: everything that is done, then (waiting) until at
        most ``limit`` blocks are in flight."""
        while self.queue:
            result, fn = self.queue[0]
            if isinstance(result, Future):
                if self.in_flight <= limit and not result.done():
                    return
                result = result.result()
                self.in_flight -= 1
            self.queue.popleft()
            fn(result)

    def next_slot(self) -> int:
        k = self.slot
        self.slot = (k + 1) % len(self.out)
        if k in self.reserved:  # a block still computing into it: a bug, never a user error
            raise RuntimeError(f"output slot {k} reused while its block is in flight")
        for f in self.busy[k]:
            f.result()  # the writer is done with this buffer (and raises its error, if any)
        self.busy[k] = []
        return k

    def write(self, fh, data) -> Future:
        return self.writer.submit(self._write, fh, data)

    def track(self, fut: Future) -> None:
        """Keep a future whose only output is its error (checked at drain)."""
        self.other = [f for f in self.other if not f.done() or f.result()]
        self.other.append(fut)

    def copy_range(self, fh, path: str, start: int, size: int, dst: int) -> None:
        """Copy bytes [start, start+size) of ``path`` to offset ``dst`` of ``fh`` now, on the
        copy thread; the ordered writes step over that range (``skip``)."""
        self.track(self.copier.submit(self._copy_range, fh, path, start, size, dst))

    def skip(self, fh, size: int) -> None:
        self.track(self.writer.submit(self._skip, fh, size))

    def hold(self, futures: list, info, offset: int, nbytes: int) -> None:
        """Release [offset, offset+nbytes) of ``info``'s mapping once ``futures`` are done."""
        self.held.append((futures, info, offset, nbytes))
        self.held_bytes += nbytes
        while self.held and (self.held_bytes > HELD_BYTES or all(f.done() for f in self.held[0][0])):
            self._release_one()

    def _release_one(self) -> None:
        futures, info, offset, nbytes = self.held.popleft()
        self.held_bytes -= nbytes
        for f in futures:
            f.result()
        self.reader.release(info, offset, nbytes)

    def drain(self) -> None:
        """Wait for every pending write and hash (before a file is closed); raise their errors."""
        self.settle(0)
        while self.held:
            self._release_one()
        for k in range(len(self.busy)):
            for f in self.busy[k]:
                f.result()
            self.busy[k] = []
        for f in self.other:
            f.result()
        self.other = []

    def close(self, error: bool = False) -> None:
        if error:
            self.failed = True  # queued writes return at once; nothing touches a closed file
        self.writer.shutdown(wait=True, cancel_futures=error)
        self.copier.shutdown(wait=True, cancel_futures=error)
        if self.compute is not None:
            self.compute.shutdown(wait=True, cancel_futures=error)
        self.prep.shutdown(wait=True, cancel_futures=error)
        self.prepared.clear()
        self.held.clear()
        self.queue.clear()
        self.in_flight = 0

    # --- the writer thread's side
    def _write(self, fh, data) -> None:
        """Write in pieces. Every WRITEBACK bytes, start the kernel's writeback of what
        is written so far (fadvise DONTNEED, Linux): the final fsync that makes the output
        durable then finds little left to do, and the output does not crowd the page cache."""
        if self.failed:
            return
        try:
            fd = fh.fileno()
            view = memoryview(data).cast("B")
            for i in range(0, len(view), WRITE_PIECE):  # 256 KiB pieces: one huge write() is slower
                piece = view[i : i + WRITE_PIECE]
                while piece:
                    piece = piece[os.write(fd, piece):]
            self._account(fh, view.nbytes)
        except BaseException:
            self.failed = True
            raise

    def _account(self, fh, nbytes: int) -> None:
        fd = fh.fileno()
        if self._wb_file is not fh:
            self._wb_file, self._wb_from, self._wb_pending = fh, 0, 0
        self._wb_pending += nbytes
        if self._wb_pending >= WRITEBACK and hasattr(os, "posix_fadvise"):
            pos = os.lseek(fd, 0, os.SEEK_CUR)
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, self._wb_from, pos - self._wb_from, os.POSIX_FADV_DONTNEED)
            self._wb_from, self._wb_pending = pos, 0

    def _skip(self, fh, size: int) -> None:
        if not self.failed:
            os.lseek(fh.fileno(), size, os.SEEK_CUR)

    def _copy_range(self, fh, path: str, start: int, size: int, dst: int) -> None:
        """Bytes [start, start+size) of ``path`` to offset ``dst`` of ``fh`` (its position
        unchanged), then start their writeback."""
        if self.failed:
            return
        try:
            fd, out = os.open(path, os.O_RDONLY), fh.fileno()
            try:
                off, at, left = start, dst, size
                while left:
                    n = 0
                    if self.kernel_copy:
                        try:
                            n = os.copy_file_range(fd, out, left, off, at)
                        except OSError:  # another filesystem, an old kernel: plain reads and writes
                            self.kernel_copy = False
                    if not n:
                        data = os.pread(fd, min(CHUNK, left), off)
                        if not data:
                            raise AdapterHubError(f"{path}: ends early (truncated file?)")
                        view = memoryview(data)
                        while view:
                            view = view[os.pwrite(out, view, at + len(data) - len(view)):]
                        n = len(data)
                    off += n
                    at += n
                    left -= n
            finally:
                os.close(fd)
            if size >= WRITE_PIECE and hasattr(os, "posix_fadvise"):
                with contextlib.suppress(OSError):
                    os.posix_fadvise(out, dst, size, os.POSIX_FADV_DONTNEED)
        except BaseException:
            self.failed = True
            raise


def block_rows(shape) -> tuple[int, int, int]:
    """(rows, elements per row, rows per block)."""
    shape = list(shape) or [1]
    rows = int(shape[0])
    row = max(1, numel(shape) // max(rows, 1))
    block = max(1, BLOCK_ELEMS // row)
    if block >= 2 * ROWS:  # the C kernel's row group (cast.ROWS): blocks cut at multiples of it
        block -= block % (2 * ROWS)
    return rows, row, min(rows, block)


def copy_tensor(t: OutTensor, reader: Reader, hasher: Hasher | None, fh, pipe: Pipeline) -> None:
    """Copy an untouched tensor: by the kernel, to its place, at once (when nothing needs
    hashing); else from the mapping, after the blocks still in flight (writes are in order)."""
    info = t.source
    size = info.end - info.start
    if (hasher is None or not hasher.enabled) and pipe.kernel_copy:  # as cp does: copy_file_range
        reader.begin(info)
        pipe.copy_range(fh, info.file, info.start, size, pipe.data_start + t.offset)
        reader.end(info)
        pipe.then(None, lambda _: pipe.skip(fh, size))
        return
    pipe.then(None, lambda _: _copy_now(t, reader, hasher, fh, pipe))


def _copy_now(t: OutTensor, reader: Reader, hasher: Hasher | None, fh, pipe: Pipeline) -> None:
    info = t.source
    size = info.end - info.start
    reader.begin(info)
    h = hasher.start(info) if hasher else None
    pos = 0
    while pos < size:
        n = min(CHUNK, size - pos)
        view = reader.view(info, pos, n)
        futures = [pipe.write(fh, view)]
        if h is not None:
            futures.append(hasher.update(h, view))
        pipe.hold(futures, info, pos, n)
        pos += n
    if hasher:
        hasher.finish(info.name, h)
    reader.end(info)


def _as_f32(x) -> np.ndarray:
    """A float32 numpy array from a numpy array or (library callers) a torch tensor."""
    if not isinstance(x, np.ndarray):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _replacement(t: OutTensor, e: Edit, reader: Reader, report: MergeReport, notify):
    """The tensor that replaces the base one, if any. A saved copy of a target's own base
    layer counts only when it differs from the base (checked block by block, before any write)."""
    replacement = _as_f32(e.replace[0]) if e.replace is not None else None
    if not e.saved_base:
        return replacement
    info = t.source
    rows, row, block = block_rows(info.shape)
    item = ITEMSIZE[info.dtype]
    for saved, label in e.saved_base:
        flat = _as_f32(saved).reshape(rows, row)
        same = True
        for r0 in range(0, rows, block):
            r1 = min(rows, r0 + block)
            nbytes = (r1 - r0) * row * item
            src = to_f32(reader.view(info, r0 * row * item, nbytes), info.dtype).reshape(r1 - r0, row)
            reader.release(info, r0 * row * item, nbytes)
            if not np.array_equal(flat[r0:r1], src):
                same = False
                break
        if same:
            continue
        if replacement is not None:
            raise AdapterHubError(f"{t.name} is replaced by more than one adapter ({label} among them)",
                                  "merge them one at a time")
        report.warn(f"{label}: its saved copy of {t.name} differs from the base; using the saved copy", notify)
        replacement = _as_f32(saved)
    return replacement


def _factors(deltas: list[tuple[LoraModule, float]], transposed: bool):
    """(left, right, rank) with delta rows [r0:r1] = left[r0:r1] @ right: every adapter's
    factors stacked along the rank, wᵢ·sᵢ folded into B, so k adapters are ONE product."""
    mods = [(m, w) for m, w in deltas if m.transposed == transposed]
    if not mods:
        return None
    a, b = stack_factors(mods, numpy=True)  # (R, in), (out, R)
    if transposed:  # W stored (in, out): its rows are input features
        return np.ascontiguousarray(a.T), np.ascontiguousarray(b.T), a.shape[0]
    return b, a, a.shape[0]


def _stacked_packed(mods: list[tuple[LoraModule, float]], transposed: bool):
    """What _factors + pack_right give for one product, built in place in one pass per
    factor: left (rows, R) and right packed in 16-column tiles (cast.pack_right's layout)."""
    parts = []
    for m, w in mods:
        a, b, sw = _as_f32(m.A), _as_f32(m.B), np.float32(m.scale * w)
        parts.append((a.T, b.T, sw, False) if transposed else (b, a, sw, True))
    rows, cols = parts[0][0].shape[0], parts[0][1].shape[1]
    rank = sum(p[1].shape[0] for p in parts)
    tiles, full = -(-cols // TILE), cols // TILE * TILE
    left = np.empty((rows, rank), dtype=np.float32)
    packed = np.empty((tiles, rank, TILE), dtype=np.float32)
    k0 = 0
    for lf, rt, sw, scale_left in parts:
        k1 = k0 + rt.shape[0]
        if scale_left:
            np.multiply(lf, sw, out=left[:, k0:k1])
        else:
            left[:, k0:k1] = lf
            rt = rt * sw
        packed[: full // TILE, k0:k1, :] = rt[:, :full].reshape(k1 - k0, full // TILE, TILE).transpose(1, 0, 2)
        if full < cols:
            packed[-1, k0:k1, :] = 0
            packed[-1, k0:k1, : cols - full] = rt[:, full:]
        k0 = k1
    return left, packed, rank


def prepare(e: Edit | None):
    """(products, packed right factor of the fused single product, else None): the per-tensor set-up,
    run a tensor ahead on a helper thread so the compute threads do not wait for it."""
    e = e or Edit()
    if has_dora(e.deltas):  # DoRA: merge/dora.py builds its own operands, adapter by adapter
        return [], None
    if any(m.expert is not None for m, _ in e.deltas):  # slices of a fused expert tensor
        return [_expert_factors(m, w) for m, w in e.deltas], None
    kinds = {m.transposed for m, _ in e.deltas}
    if len(kinds) == 1 and not e.bias:  # the fused kernel's case: build its operands directly
        left, packed, rank = _stacked_packed(e.deltas, kinds.pop())
        return [(left, None, rank)], packed
    # bias deltas, or adapters of both orientations on one tensor: numpy products, no packing
    return [f for f in (_factors(e.deltas, False), _factors(e.deltas, True)) if f is not None], None


def _expert_factors(m: LoraModule, w: float):
    """(left, right, expert): slice [expert] of a fused (E, d1, d2) tensor gets left @ right,
    (d1, d2) in the tensor's orientation. Its rows of the (E, d1·d2) view are the experts, so a
    row block holds whole experts and each product lands on one row of it."""
    if m.expert is None:  # plan: a fused tensor's key never ends in ".weight"
        raise AdapterHubError(f"{m.name}: a plain LoRA module and expert slices on one tensor")
    lf, rt, _ = _factors([(m, w)], m.transposed)
    return lf, rt, ("expert", m.expert)


def compute_tensor(t: OutTensor, e: Edit | None, reader: Reader, hasher: Hasher | None, fh,
                   pipe: Pipeline, report: MergeReport, notify, prepared=None) -> None:
    """W' = (replacement or W) + Σ wᵢsᵢBᵢAᵢ (+ bias deltas), row block by row block."""
    info = t.source
    e = e or Edit()
    replacement = _replacement(t, e, reader, report, notify)
    products, packed = prepared.result() if prepared is not None else prepare(e)
    bias = None
    if e.bias:
        bias = sum(_as_f32(m.bias) * np.float32(m.scale * w) for m, w in e.bias)
    rows, row, block = block_rows(info.shape)
    dora = DoraTensor(t.name, e.deltas, rows, row, _stacked_packed) if has_dora(e.deltas) else None
    if replacement is not None:
        replacement = replacement.reshape(rows, row)
    if bias is not None:
        bias = bias.reshape(rows, row)
    # the usual case: one product (all adapters stacked), fused with the add and the cast in C
    experts = [p for p in products if isinstance(p[2], tuple)]
    products = [p for p in products if not isinstance(p[2], tuple)]
    fused = len(products) == 1 and bias is None and not experts
    if fused:
        left, _, rank = products[0]
    pool = pipe.compute if fused and rank > LOWRANK_SPLIT else None

    src_item, out_dtype = ITEMSIZE[info.dtype], t.dtype
    out_kind = out_dtype if out_dtype in KINDS else "F32"  # F64 output: float32 math, then widened
    out_item = ITEMSIZE[out_kind]

    def finish(k, out, futures, r0, n, bad) -> None:  # in order: check, write, release the mapped range
        pipe.reserved.discard(k)
        if out_dtype == "F16" and bad:
            raise AdapterHubError(f"{t.name}: the merged tensor overflows float16",
                                  "use --dtype bfloat16 or float32, or smaller weights")
        data = out if out_kind == out_dtype else out.view(np.float32).astype(np.float64)
        pipe.busy[k].append(pipe.write(fh, data))
        pipe.hold(futures, info, r0 * row * src_item, n * src_item)

    reader.begin(info)
    if dora is not None and dora.needs_prepass:  # column norms: one read of the tensor first
        pipe.settle(0)
        for r0 in range(0, rows, block):
            r1 = min(rows, r0 + block)
            nbytes = (r1 - r0) * row * src_item
            base = (replacement[r0:r1] if replacement is not None else
                    to_f32(reader.view(info, r0 * row * src_item, nbytes), info.dtype))
            dora.add_columns(base, r0, r1)
            if replacement is None:
                reader.release(info, r0 * row * src_item, nbytes)
    h = hasher.start(info) if hasher else None
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        n = (r1 - r0) * row
        # room for this block: the compute threads keep up to pipe.depth blocks, across tensors
        pipe.settle(pipe.depth - 1 if pool is not None else 0)
        k = pipe.next_slot()
        view = reader.view(info, r0 * row * src_item, n * src_item)
        futures = [hasher.update(h, view)] if h is not None else []
        if replacement is not None:
            src, src_kind = replacement[r0:r1].reshape(-1), "F32"
        elif info.dtype in KINDS:
            src, src_kind = view, info.dtype
        else:
            src, src_kind = to_f32(view, info.dtype), "F32"
        out = pipe.out[k][: n * out_item]
        if pool is not None:
            bad = pool.submit(lowrank_add_cast, src, src_kind, left[r0:r1], packed, rank, out, out_kind)
        elif fused:
            bad = lowrank_add_cast(src, src_kind, left[r0:r1], packed, rank, out, out_kind)
        elif dora is not None:
            bad = dora.write(src, src_kind, r0, r1, out, out_kind)
        else:
            d = None
            if products or experts or bias is not None:
                d = pipe.delta[:n].reshape(r1 - r0, row)
                d[:] = 0
                for lf, rt, _ in products:
                    d += lf[r0:r1] @ rt
                for lf, rt, (_, x) in experts:
                    if r0 <= x < r1:
                        d[x - r0] += (lf @ rt).reshape(-1)
                if bias is not None:
                    d += bias[r0:r1]
            bad = add_cast(src, src_kind, d, out, out_kind)
        pipe.reserved.add(k)
        pipe.then(bad, functools.partial(finish, k, out, futures, r0, n))
    if hasher:
        hasher.finish(info.name, h)  # after this tensor's updates, on the same hashing thread
    pipe.then(None, lambda _: reader.end(info))
