"""The one safetensors reader (and header writer) every command uses, adapters and bases alike.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the
tensor data. The JSON maps tensor names to ``{"dtype", "shape", "data_offsets": [start, end]}``
(offsets relative to the data section) plus an optional ``"__metadata__"`` of strings.

Nothing in a header is used before all of it is checked (docs/validation.md):

* N is at most 100 MB (safetensors' own limit) and the header lies inside the file;
* the header is UTF-8 JSON, an object, no key twice (at any level); deep nesting is refused
  (json's recursion limit: a RecursionError is caught, no crash);
* every entry names a dtype of ``DTYPES``, a shape of at most 64 non-negative integers, and
  integer ``data_offsets`` with ``end - start == numel × itemsize``;
* the byte ranges tile the data section exactly as safetensors requires: no overlap, no gap,
  nothing past the end and nothing left over (a truncated file fails here);
* ``__metadata__`` maps strings to strings.

A violation is one ``InvalidModel`` (base shards) or ``InvalidAdapter`` (adapter files) naming
the file and the tensor. Arrays are numpy views of a private (copy-on-write) mapping of the
file: no copy, no torch; ``torch.from_numpy`` turns one into a tensor without a copy where math
needs torch. The merge writer lays out its shard headers with ``encode_header`` and checks them
with the same parser, so we never write a file that we (or safetensors) would refuse.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InvalidModel
from .fsutil import atomic_write_bytes, open_input

if TYPE_CHECKING:
    import numpy as np

MAX_HEADER = 100_000_000  # bytes; safetensors refuses larger headers too
MAX_DIMS = 64


@dataclass(frozen=True)
class DType:
    name: str  # as safetensors spells it
    itemsize: int
    numpy: str | None  # numpy's dtype for it; None: no numpy equivalent (read raw)
    floating: bool
    torch: str  # torch's name, for messages and reports
    special: int = 0  # floats: the bits that are all ones in every inf and NaN (0: none)


# The one dtype table. BF16 has no numpy dtype: its arrays are upcast to float32 on read (exact).
# ``special``: a float is inf or NaN exactly when these exponent bits are all ones (IEEE 754;
# float8_e4m3fn has no inf and one NaN pattern per sign, S.1111.111, hence its 0x7F).
DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("F64", 8, "<f8", True, "float64", 0x7FF0000000000000),
        DType("F32", 4, "<f4", True, "float32", 0x7F800000),
        DType("F16", 2, "<f2", True, "float16", 0x7C00),
        DType("BF16", 2, None, True, "bfloat16", 0x7F80),
        DType("F8_E4M3", 1, None, True, "float8_e4m3fn", 0x7F),
        DType("F8_E5M2", 1, None, True, "float8_e5m2", 0x7C),
        DType("I64", 8, "<i8", False, "int64"),
        DType("I32", 4, "<i4", False, "int32"),
        DType("I16", 2, "<i2", False, "int16"),
        DType("I8", 1, "i1", False, "int8"),
        DType("U64", 8, "<u8", False, "uint64"),
        DType("U32", 4, "<u4", False, "uint32"),
        DType("U16", 2, "<u2", False, "uint16"),
        DType("U8", 1, "u1", False, "uint8"),
        DType("BOOL", 1, "?", False, "bool"),
    )
}
ITEMSIZE = {k: d.itemsize for k, d in DTYPES.items()}
FLOATS = frozenset(
    k for k, d in DTYPES.items() if d.floating and d.itemsize >= 2
)  # what merges take


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list[int]
    start: int  # absolute byte offset in the file
    end: int
    file: str


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _show(name) -> str:
    """A tensor name for an error line: quoted, control characters escaped, length bounded."""
    text = json.dumps(str(name), ensure_ascii=True)
    return text if len(text) <= 80 else text[:60] + "…" + text[-15:]


class HeaderError(ValueError):
    """What is wrong with a header; the caller adds the file (see ``read_header``)."""


def _no_duplicates(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise HeaderError(f"key {_show(dup)} appears twice in the header")
    return d


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_header(
    raw: bytes, data_len: int
) -> tuple[dict[str, tuple[str, list[int], int, int]], dict[str, str]]:
    """Validate header JSON ``raw`` for a data section of ``data_len`` bytes.

    Returns ({name: (dtype, shape, start, end)} with offsets relative to the data section,
    metadata). Raises HeaderError with a one-line reason naming the tensor.
    """
    if not raw.lstrip(b" \t\r\n").startswith(b"{"):
        raise HeaderError("the header is not a JSON object")
    try:
        text = raw.decode("utf-8")
        header = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=lambda c: _raise(f"{c} is not allowed in a header"),
        )
    except HeaderError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise HeaderError(
            f"the header is not valid JSON ({str(e).splitlines()[0][:120]})"
        ) from None
    if not isinstance(header, dict):
        raise HeaderError("the header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise HeaderError("__metadata__ must map strings to strings")
    entries: dict[str, tuple[str, list[int], int, int]] = {}
    for name, info in header.items():
        entries[name] = _entry(name, info, data_len)
    _check_tiling(entries, data_len)
    return entries, meta


def _raise(msg: str):
    raise HeaderError(msg)


def _entry(name: str, info, data_len: int) -> tuple[str, list[int], int, int]:
    try:
        dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        item = DTYPES[dtype].itemsize
    except (TypeError, KeyError, ValueError):
        _entry_error(name, info)
    if (
        type(shape) is not list
        or len(shape) > MAX_DIMS
        or type(start) is not int
        or type(end) is not int
        or not 0 <= start <= end
        or not all(type(s) is int and s >= 0 for s in shape)
    ):
        _entry_error(name, info)
    if end > data_len:
        raise HeaderError(
            f"tensor {_show(name)}: ends at byte {end} of a {data_len}-byte data section "
            "(truncated?)"
        )
    need = 0 if 0 in shape else item
    for s in shape if need else ():  # stop once the product passes the file: no 2**40 shapes
        need *= s
        if need > data_len:
            break
    if need != end - start:
        raise HeaderError(
            f"tensor {_show(name)}: data_offsets [{start}, {end}] hold {end - start} bytes but "
            f"shape {_shape(shape)} of {dtype} needs {_bytes(shape, dtype)}"
        )
    return dtype, shape, start, end


def _entry_error(name: str, info) -> None:
    """The precise reason an entry is malformed (the fast path above only knows that it is)."""
    t = f"tensor {_show(name)}"
    if not isinstance(info, dict):
        raise HeaderError(f"{t}: entry is not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise HeaderError(f"{t}: entry has no {', '.join(missing)}")
    dtype, shape = info["dtype"], info["shape"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        shown = _show(dtype) if isinstance(dtype, str) else type(dtype).__name__
        raise HeaderError(f"{t}: unknown dtype {shown} (known: {', '.join(sorted(DTYPES))})")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(_int(s) and s >= 0 for s in shape)
    ):
        raise HeaderError(f"{t}: shape must be a list of at most {MAX_DIMS} non-negative integers")
    raise HeaderError(f"{t}: data_offsets must be two integers 0 <= start <= end")


def _shape(shape: list[int]) -> str:
    text = json.dumps(shape)
    return text if len(text) <= 60 else text[:57] + "…]"


def _bytes(shape: list[int], dtype: str) -> str:
    n = numel(shape) * DTYPES[dtype].itemsize if len(shape) <= MAX_DIMS else None
    return f"{n} bytes" if n is not None and n < 10**30 else "more bytes than any file holds"


def _check_tiling(entries: dict, data_len: int) -> None:
    """safetensors' rule: sorted by offset the ranges follow each other with no gap and end at
    the end of the file. Zero-byte tensors sit anywhere inside the data."""
    pos, prev = 0, None
    for name, (_, _, start, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if start == end:
            continue
        if start < pos:
            raise HeaderError(
                f"tensor {_show(name)}: data_offsets [{start}, {end}] overlap tensor "
                f"{_show(prev)} (which ends at {pos})"
            )
        if start > pos:
            where = f"tensor {_show(prev)}" if prev is not None else "the start of the data"
            raise HeaderError(
                f"tensor {_show(name)}: {start - pos} unaccounted bytes between {where} and it"
            )
        pos, prev = end, name
    if pos != data_len:
        raise HeaderError(
            f"{data_len - pos} bytes after the last tensor are not described by the header"
        )


def read_header(path, error: type = InvalidModel) -> tuple[dict[str, TensorInfo], dict]:
    """Tensors (with absolute byte ranges) and ``__metadata__`` of a safetensors file, every
    field validated. ``error`` is the class raised (InvalidModel or InvalidAdapter)."""
    path = Path(path)
    try:
        with open_input(path) as fh:  # never through a symlink, never a FIFO or device
            size = os.fstat(fh.fileno()).st_size
            first = fh.read(8)
            if len(first) != 8:
                raise HeaderError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", first)
            if n > MAX_HEADER:
                raise HeaderError(f"header length {n} exceeds the {MAX_HEADER}-byte limit")
            if n > size - 8:
                raise HeaderError(f"header length {n} points past the end of the {size}-byte file")
            raw = fh.read(n)
            if len(raw) != n:
                raise HeaderError("file shorter than its header")
        entries, meta = parse_header(raw, size - 8 - n)
    except HeaderError as e:
        raise error(path, f"not a readable safetensors file, truncated or corrupt ({e})") from None
    except OSError as e:
        raise error(path, f"not a readable safetensors file ({e.strerror or e})") from None
    base = 8 + n
    tensors = {
        name: TensorInfo(name, dtype, shape, base + s, base + e, path.name)
        for name, (dtype, shape, s, e) in entries.items()
    }
    return tensors, meta


def _map_checked(path: Path, infos: dict[str, TensorInfo], error: type, access: int):
    """The whole file mapped (``access``: ACCESS_COPY for arrays, ACCESS_READ for views),
    opened as ``read_header`` opens it, and still long enough for every entry of its header."""
    try:
        with open_input(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            data = mmap.mmap(fh.fileno(), size, access=access) if size else bytearray()
    except (OSError, ValueError) as e:
        raise error(path, f"not a readable safetensors file ({getattr(e, 'strerror', None) or e})") from None
    if len(data) < max((i.end for i in infos.values()), default=0):  # it shrank since the header was read
        raise error(path, "not a readable safetensors file, truncated or corrupt (the file changed while read)")
    return data


def read_arrays(
    path, error: type = InvalidModel, float32: bool = False
) -> tuple[dict[str, np.ndarray], dict, dict[str, TensorInfo]]:
    """Every tensor of a validated file as a numpy array; the metadata; the header's entries.

    Arrays with a numpy dtype are views of one copy-on-write mapping (no copy; writable, and
    writes stay private). BF16 is upcast to float32 (exact); with ``float32`` every floating
    tensor is. F8 tensors have no numpy form and are refused.
    """
    import numpy as np  # here, not at the top: header-only readers (check, fingerprint) skip it

    infos, meta = read_header(path, error)
    path = Path(path)
    data = _map_checked(path, infos, error, mmap.ACCESS_COPY)
    out: dict[str, np.ndarray] = {}
    for name, info in infos.items():
        dt = DTYPES[info.dtype]
        n = numel(info.shape)
        if info.dtype == "BF16":
            bits = np.frombuffer(data, dtype="<u2", count=n, offset=info.start)
            a = (bits.astype(np.uint32) << 16).view(np.float32).reshape(info.shape)
        elif dt.numpy is None:
            refuse_unreadable(infos, path, error)
        else:
            a = np.frombuffer(data, dtype=dt.numpy, count=n, offset=info.start).reshape(info.shape)
            if float32 and dt.floating and a.dtype != np.float32:
                a = a.astype(np.float32)
        out[name] = a
    return out, meta, infos


def refuse_unreadable(infos: dict[str, TensorInfo], path, error: type) -> None:
    """Refuse a file holding a dtype that has no numpy form (F8): what ``read_arrays`` cannot
    give, ``read_views`` callers refuse alike, so both paths take the same files."""
    for name, info in infos.items():
        if DTYPES[info.dtype].numpy is None and info.dtype != "BF16":
            raise error(Path(path), f"tensor {_show(name)} has dtype {info.dtype}, which has no numpy form")


def _kernels_scan():
    """The C kernel's ``first_nonfinite``, or None where it was not built (or is stale)."""
    try:
        from . import _kernels
    except ImportError:
        return None
    return getattr(_kernels, "first_nonfinite", None)


def _first_special(buf, dt: DType) -> int:
    """Index of the first inf or NaN among ``buf``'s ``dt`` elements, -1 if none: the C kernel's
    branch-free scan where it was built, else numpy on the same bits (the same answers)."""
    scan = _kernels_scan()
    if scan is not None:
        return scan(buf, dt.itemsize, dt.special)
    import numpy as np

    n = len(buf) // dt.itemsize
    bits = np.frombuffer(buf, dtype=f"<u{dt.itemsize}", count=n)
    hit = np.flatnonzero((bits & dt.special) == dt.special)
    return int(hit[0]) if hit.size else -1


@dataclass(frozen=True)
class TensorView:
    """A tensor as its validated header describes it, over a read-only mapping of its bytes:
    what checking an adapter needs (shape, dtype, whether every value is finite) without numpy.
    ``read_views`` makes them; ``read_arrays`` is for math."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: memoryview  # exactly this tensor's bytes

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def floating(self) -> bool:
        return DTYPES[self.dtype].floating

    def first_nonfinite(self) -> int:
        """Flat index of the first inf or NaN, -1 if none (or not a float)."""
        dt = DTYPES[self.dtype]
        return _first_special(self.data, dt) if dt.special else -1

    def all_finite(self) -> bool:
        return self.first_nonfinite() < 0


def read_views(path, error: type = InvalidModel) -> tuple[dict[str, TensorView], dict, dict[str, TensorInfo]]:
    """Like ``read_arrays`` but numpy-free: every tensor of a validated file as a ``TensorView``
    of one read-only mapping (what ``adapters register`` and ``push`` check, at start-up cost)."""
    infos, meta = read_header(path, error)
    path = Path(path)
    whole = memoryview(_map_checked(path, infos, error, mmap.ACCESS_READ))
    views = {name: TensorView(name, info.dtype, tuple(info.shape), whole[info.start:info.end])
             for name, info in infos.items()}
    return views, meta, infos


def save_safetensors(
    tensors: dict, path: str | os.PathLike, metadata: dict | None = None, fsync: bool = True
) -> int:
    """Serialise ``tensors`` (numpy arrays or torch tensors) to ``path`` atomically with
    safetensors' own writer; returns the byte size. All numpy arrays: written without torch
    (same bytes as torch would write). The bytes pass our reader's checks before they land."""
    import numpy as np

    if all(isinstance(v, np.ndarray) for v in tensors.values()):
        from safetensors.numpy import save as save_np

        data = save_np({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)
    else:
        from safetensors.torch import save

        from .lora import as_torch

        data = save({k: as_torch(v).contiguous() for k, v in tensors.items()}, metadata=metadata)
    check_encoded(data)  # never write a file our own reader would refuse
    atomic_write_bytes(path, data, fsync=fsync)
    return len(data)


def check_encoded(data: bytes) -> None:
    """Assert that a whole serialised file (e.g. safetensors' ``save`` output) passes our reader."""
    (n,) = struct.unpack("<Q", data[:8])
    try:
        if n > MAX_HEADER or 8 + n > len(data):
            raise HeaderError("header length out of bounds")
        parse_header(bytes(data[8 : 8 + n]), len(data) - 8 - n)
    except HeaderError as e:
        raise AssertionError(f"refusing to write an invalid safetensors file: {e}") from None


def encode_header(entries, metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header, padded with spaces to 8 bytes as safetensors pads.

    ``entries`` are (name, dtype, shape, start, end) with offsets in the data section, in order.
    The result is checked with ``parse_header``: a header we would refuse is a bug, raised here
    before any byte is written.
    """
    header: dict = {"__metadata__": dict(metadata)} if metadata is not None else {}
    data_len = 0
    for name, dtype, shape, start, end in entries:
        header[name] = {
            "dtype": dtype,
            "shape": [int(s) for s in shape],
            "data_offsets": [int(start), int(end)],
        }
        data_len = max(data_len, int(end))
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    try:
        parse_header(raw, data_len)
    except HeaderError as e:
        raise AssertionError(f"refusing to write an invalid safetensors header: {e}") from None
    return len(raw).to_bytes(8, "little") + raw
