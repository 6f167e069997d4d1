"""Streaming safetensors I/O for merges: our own reader and sharded writer.

The reader maps each shard file (mmap) and hands out read-only views of one row
block at a time, dropping the pages of a block from our address space once it is
done (the page cache keeps them; our RSS does not grow with the model); extract
reads whole tensors into its own buffers. The writer lays out every output shard's
header first (all shapes and dtypes are known before any data moves), then appends
tensor bytes in order. Nothing ever holds the model, and nothing here needs torch.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AdapterHubError, InvalidModel
from ..fingerprint import model_files
from ..safetensors_io import FLOATS as FLOAT_ST  # noqa: F401 (merge/ imports it from here)
from ..safetensors_io import ITEMSIZE, TensorInfo, encode_header, numel, read_header

DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "bf16": "BF16", "fp16": "F16",
               "fp32": "F32", "half": "F16", "float": "F32"}

INDEX_NAME = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def output_dtype(name: str | None) -> str | None:
    """--dtype value -> safetensors dtype string; None means keep each tensor's own dtype."""
    if name is None or name == "auto":
        return None
    key = str(name).lower().replace("torch.", "")
    if key not in DTYPE_NAMES:
        raise AdapterHubError(f"--dtype {name!r}: choose auto, bfloat16, float16 or float32")
    return DTYPE_NAMES[key]


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000 (Hugging Face's convention)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise AdapterHubError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    num = float(m.group(1))
    unit = (m.group(2) or "").upper()
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[:1] if unit[:1] in "KMGT" else ""]
    size = int(num * base**power)
    if size <= 0:
        raise AdapterHubError(f"--max-shard-size {text!r} must be positive")
    return size


def scan_model(model_dir: Path) -> tuple[list[Path], dict[str, TensorInfo]]:
    """Shard files and every tensor (with its byte range), in file then offset order."""
    files = model_files(model_dir)
    infos: dict[str, TensorInfo] = {}
    for f in files:
        header, _ = read_header(f)
        for info in sorted(header.values(), key=lambda t: t.start):
            if info.name in infos:
                raise InvalidModel(model_dir, f"tensor {info.name} appears in more than one shard")
            info.file = str(f)
            infos[info.name] = info
    return files, infos


class Reader:
    """Reads tensors' raw bytes from shard files: views of a mapping, or copies into buffers.

    Tests instrument ``live`` / ``max_live`` (tensors whose bytes are held at once) and
    ``view`` / ``read_into`` (every read goes through one of them).
    """

    PAGE = mmap.PAGESIZE

    def __init__(self):
        self._fh: dict[str, object] = {}
        self._maps: dict[str, tuple[mmap.mmap, memoryview]] = {}
        self.live = 0
        self.max_live = 0
        self.bytes_read = 0
        self.max_tensor_bytes = 0
        self.max_read_bytes = 0  # the largest single read: a row block or a copy chunk

    def _handle(self, path: str):
        fh = self._fh.get(path)
        if fh is None:
            for old in list(self._fh):  # one shard open at a time; reads go shard by shard
                self._fh.pop(old).close()
            fh = self._fh[path] = open(path, "rb", buffering=0)  # noqa: SIM115 (closed in close())
        return fh

    def _map(self, path: str):
        m = self._maps.get(path)
        if m is None:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                mm = mmap.mmap(fh.fileno(), size, prot=mmap.PROT_READ) if size else None
            m = self._maps[path] = (mm, memoryview(mm) if mm is not None else memoryview(b""))
        return m

    def begin(self, info: TensorInfo) -> None:
        self.live += 1
        self.max_live = max(self.max_live, self.live)
        self.max_tensor_bytes = max(self.max_tensor_bytes, info.end - info.start)

    def end(self, info: TensorInfo) -> None:
        self.live -= 1

    def _account(self, n: int) -> None:
        self.bytes_read += n
        self.max_read_bytes = max(self.max_read_bytes, n)

    def view(self, info: TensorInfo, offset: int, nbytes: int) -> memoryview:
        """Bytes [start+offset, start+offset+nbytes) of the tensor, read-only, without a copy."""
        _, mv = self._map(info.file)
        pos = info.start + offset
        if pos + nbytes > len(mv):
            raise InvalidModel(info.file, f"tensor {info.name} is cut short (truncated file?)")
        self._account(nbytes)
        return mv[pos : pos + nbytes]

    def release(self, info: TensorInfo, offset: int, nbytes: int) -> None:
        """Drop the whole pages of a range we are done with from this process (MADV_DONTNEED on
        a read-only file mapping: the page cache keeps them, a later touch maps them again)."""
        mm, _ = self._maps.get(info.file, (None, None))
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        lo = info.start + offset
        lo += -lo % self.PAGE
        hi = info.start + offset + nbytes
        hi -= hi % self.PAGE
        if hi > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def read_into(self, info: TensorInfo, view: memoryview, offset: int = 0) -> None:
        """Fill ``view`` with bytes [start+offset, start+offset+len(view)) of the tensor."""
        fd = self._handle(info.file).fileno()
        pos = info.start + offset
        got = 0
        n = len(view)
        while got < n:  # pread: no seek, one syscall, the GIL released while it runs
            k = os.preadv(fd, [view[got:]], pos + got)
            if not k:
                raise InvalidModel(info.file, f"tensor {info.name} is cut short (truncated file?)")
            got += k
        self._account(n)

    def close(self) -> None:
        for fh in self._fh.values():
            fh.close()
        self._fh.clear()
        for mm, mv in self._maps.values():
            with contextlib.suppress(BufferError):  # a view still alive: the GC unmaps it later
                mv.release()
                if mm is not None:
                    mm.close()
        self._maps.clear()


@dataclass
class OutTensor:
    name: str
    dtype: str  # safetensors dtype of the output
    shape: list[int]
    source: TensorInfo  # where the base bytes come from
    nbytes: int = 0
    shard: int = 0
    offset: int = 0  # within the shard's data section
    meta: dict = field(default_factory=dict)


def plan_shards(tensors: list[OutTensor], max_shard_size: int) -> list[list[OutTensor]]:
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        t.nbytes = numel(t.shape) * ITEMSIZE[t.dtype]
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        t.shard = len(shards) - 1
        t.offset = size
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def shard_header(tensors: list[OutTensor]) -> bytes:
    """The 8-byte length plus JSON header (validated by the reader's own rules)."""
    return encode_header([(t.name, t.dtype, t.shape, t.offset, t.offset + t.nbytes) for t in tensors],
                         {"format": "pt"})


def index_json(shards: list[list[OutTensor]], names: list[str]) -> str:
    weight_map = {t.name: names[i] for i, shard in enumerate(shards) for t in shard}
    total = sum(t.nbytes for shard in shards for t in shard)
    return json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                      indent=2) + "\n"


def side_files(model_dir: Path) -> list[Path]:
    """config, generation config, tokenizer and other small files a merged model needs."""
    out = []
    for p in sorted(Path(model_dir).iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.name.endswith(WEIGHT_SUFFIXES) or p.name in (INDEX_NAME, "README.md", "recipe.yaml",
                                                          "model.safetensors.index.json"):
            continue
        if p.name.endswith(".index.json"):
            continue
        out.append(p)
    return out
