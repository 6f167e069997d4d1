"""The streaming pipeline of a merge into a base: read, hash, compute, write.

Two of every buffer, allocated once at the largest row block any tensor needs, so
hashing (one thread) overlaps reading, the float32 arithmetic and writing (the
main thread); a buffer is reused only after the hash thread is done with it.
Writes stay on the main thread: a writer thread was measured no faster on a 2-core
machine (every 256 KiB write() must win the GIL back from the main thread) and it
burned 10-25% more CPU.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import AdapterHubError
from ..fingerprint import _tensor_head
from ..lora import LoraModule
from .io import ITEMSIZE, ST_TO_TORCH, OutTensor, Reader, numel
from .plan import Edit
from .report import MergeReport

CHUNK = 1024 * 1024  # copy / hash granularity for untouched tensors
WRITE_PIECE = 256 * 1024
WRITEBACK = 64 * 1024 * 1024  # start writeback of the output every 64 MiB
BLOCK_ELEMS = 1024 * 1024  # elements per row block (4 MiB in float32)


class Hasher:
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


class Buffers:
    """Buffers allocated once (at the largest row block any tensor needs) and reused, two of
    each so hashing overlaps the rest; a buffer is reused only after the hash thread is done
    with it."""

    def __init__(self, max_raw: int, max_block: int, max_out: int):
        self.raw = [torch.empty(max(max_raw, 1), dtype=torch.uint8) for _ in range(2)]
        self.raw_views = [memoryview(r.numpy()) for r in self.raw]
        self.f32 = [torch.empty(max(max_block, 1), dtype=torch.float32) for _ in range(2)]
        self.out = [torch.empty(max(max_out, 1), dtype=torch.uint8) for _ in range(2)]
        self.chunks = [bytearray(CHUNK), bytearray(CHUNK)]
        self.pending: dict[str, list[list]] = {"raw": [[], []], "chunk": [[], []]}
        self._wb_file, self._wb_from, self._wb_pending = None, 0, 0
        self.kernel_copy = hasattr(os, "copy_file_range")

    def claim(self, kind: str, k: int) -> None:
        for f in self.pending[kind][k]:
            f.result()
        self.pending[kind][k] = []

    def hold(self, kind: str, k: int, fut) -> None:
        if fut is not None:
            self.pending[kind][k].append(fut)

    def write(self, fh, data):
        self._write(fh, data)

    def _write(self, fh, data) -> None:
        """Write in pieces. Every WRITEBACK bytes, start the kernel's writeback of what
        is written so far (fadvise DONTNEED, Linux): the final fsync that makes the output
        durable then finds little left to do, and the output does not crowd the page cache."""
        fd = fh.fileno()
        view = memoryview(data).cast("B")
        for i in range(0, len(view), WRITE_PIECE):  # 256 KiB pieces: one huge write() is slower
            piece = view[i : i + WRITE_PIECE]
            while piece:
                piece = piece[os.write(fd, piece):]
        self._account(fh, view.nbytes)

    def _account(self, fh, nbytes: int) -> None:
        fd = fh.fileno()
        if self._wb_file is not fh:
            self._wb_file, self._wb_from, self._wb_pending = fh, 0, 0
        self._wb_pending += nbytes
        if self._wb_pending >= WRITEBACK and hasattr(os, "posix_fadvise"):
            pos = os.lseek(fd, 0, os.SEEK_CUR)
            try:
                os.posix_fadvise(fh.fileno(), self._wb_from, pos - self._wb_from, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            self._wb_from, self._wb_pending = pos, 0

    def copy_range(self, fh, path: str, start: int, size: int) -> None:
        """Append bytes [start, start+size) of ``path`` to ``fh``."""
        fd = os.open(path, os.O_RDONLY)
        try:
            off, left, copied = start, size, 0
            while left:
                n = 0
                if self.kernel_copy:
                    try:
                        n = os.copy_file_range(fd, fh.fileno(), left, off)
                        copied += n
                    except OSError:  # another filesystem, an old kernel: plain reads and writes
                        self.kernel_copy = False
                if not n:
                    data = os.pread(fd, min(CHUNK, left), off)
                    if not data:
                        raise AdapterHubError(f"{path}: ends early (truncated file?)")
                    self._write(fh, data)
                    n = len(data)
                off += n
                left -= n
        finally:
            os.close(fd)
        self._account(fh, copied)

    def drain(self, quiet: bool = False) -> None:
        """Wait for every pending hash of a buffer (before a file is closed or on an error)."""
        for kind in self.pending:
            for k in (0, 1):
                try:
                    self.claim(kind, k)
                except Exception:
                    if not quiet:
                        raise
                    self.pending[kind][k] = []


def block_rows(shape) -> tuple[int, int, int]:
    """(rows, elements per row, rows per block)."""
    shape = list(shape) or [1]
    rows = int(shape[0])
    row = max(1, numel(shape) // max(rows, 1))
    return rows, row, max(1, min(rows, BLOCK_ELEMS // row))


def copy_tensor(t: OutTensor, reader: Reader, hasher: Hasher | None, fh, bufs: Buffers) -> None:
    info = t.source
    size = info.end - info.start
    if hasher is None and bufs.kernel_copy:
        # nothing to hash: let the kernel copy the bytes (copy_file_range), as cp does
        reader.begin(info)
        bufs.copy_range(fh, info.file, info.start, size)
        reader.end(info)
        return
    reader.begin(info)
    h = hasher.start(info) if hasher else None
    pos = 0
    k = 0
    while pos < size:
        n = min(CHUNK, size - pos)
        bufs.claim("chunk", k)  # the hash thread may still read this buffer
        view = memoryview(bufs.chunks[k])[:n]
        reader.read_into(info, view, pos)
        if hasher:
            bufs.hold("chunk", k, hasher.update(h, view))
        bufs.write(fh, view)
        pos += n
        k ^= 1
    if hasher:
        hasher.finish(info.name, h)
    reader.end(info)


def _replacement(t: OutTensor, e: Edit, reader: Reader, bufs: Buffers, report: MergeReport, notify):
    """The tensor that replaces the base one, if any. A saved copy of a target's own base
    layer counts only when it differs from the base (checked block by block, before any write)."""
    replacement = e.replace[0] if e.replace is not None else None
    if not e.saved_base:
        return replacement
    info = t.source
    rows, row, block = block_rows(info.shape)
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


def compute_tensor(t: OutTensor, e: Edit | None, reader: Reader, hasher: Hasher | None, fh,
                   bufs: Buffers, report: MergeReport, notify) -> None:
    """W' = (replacement or W) + Σ wᵢsᵢBᵢAᵢ (+ bias deltas), row block by row block."""
    info = t.source
    e = e or Edit()
    rows, row, block = block_rows(info.shape)
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
        view = bufs.raw_views[k][: n * src_item]
        reader.read_into(info, view, r0 * row * src_item)
        if hasher:
            bufs.hold("raw", k, hasher.update(h, view))
        blk = bufs.f32[k][:n].view(r1 - r0, row)
        blk.copy_(replacement[r0:r1] if replacement is not None
                  else bufs.raw[k][: n * src_item].view(src_t).view(r1 - r0, row))
        if plain is not None:
            a, b, alpha = plain
            blk.addmm_(b[r0:r1], a, alpha=alpha)  # rows of W are output features
        if trans is not None:
            a, b, alpha = trans
            blk.addmm_(a[:, r0:r1].T, b.T, alpha=alpha)  # W stored (in, out): rows are input features
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
        bufs.write(fh, data.reshape(-1).view(torch.uint8).numpy())
        k ^= 1
    if hasher:
        hasher.finish(info.name, h)
    reader.end(info)
