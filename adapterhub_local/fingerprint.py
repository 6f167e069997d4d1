"""Base-model fingerprints: which exact weights an adapter belongs to.

The fingerprint is independent of sharding and file names. Each tensor gets a
digest, sha256(name, dtype, shape, raw bytes); the fingerprint is sha256 over
the (name, digest) list in name order. Hashing per tensor lets one sequential
pass over each file feed both the file's plain sha256 (the Hub's LFS oid) and
the tensor digests, and lets a streaming merge verify a base tensor by tensor
in whatever order it reads them, with no second read.

Headers come from the one validating reader (safetensors_io.read_header); we
hash byte ranges straight from the file, so memory stays at one read buffer and
torch is not needed.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import InvalidModel
from .fsutil import check_folder, open_input
from .safetensors_io import numel, read_header

FP_PREFIX = "sha256:"
READ = 8 * 1024 * 1024
FORMAT_VERSION = 1

def tensor_digest(name: str, dtype: str, shape, data) -> str:
    """Digest of one tensor; ``data`` is its raw bytes (bytes-like)."""
    h = hashlib.sha256(tensor_head(name, dtype, shape))
    h.update(data)
    return h.hexdigest()


def tensor_head(name: str, dtype: str, shape) -> bytes:
    """What a tensor's digest hashes before its bytes (streaming hashers start from it)."""
    return f"{name}\0{dtype}\0{','.join(str(int(s)) for s in shape)}\0".encode()


def combine(digests: dict[str, str]) -> str:
    """The model fingerprint from {tensor name: tensor digest}."""
    h = hashlib.sha256(f"adapterhub-fingerprint-v{FORMAT_VERSION}\n".encode())
    for name in sorted(digests):
        h.update(f"{name}\0{digests[name]}\n".encode())
    return FP_PREFIX + h.hexdigest()


def _plain_name(name) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def model_files(model_dir: Path) -> list[Path]:
    """The safetensors files that make up a model folder (index-aware)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InvalidModel(model_dir, "not a directory", "give a Hugging Face model folder")
    check_folder(model_dir, "model folder")  # no symlink or special file: nothing is followed out of it
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidModel(index, f"bad index file ({type(e).__name__})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise InvalidModel(index, "bad index file (weight_map must map tensor names to file names)")
        bad = [f for f in weight_map.values() if not _plain_name(f)]
        if bad:
            raise InvalidModel(index, f"shard name {bad[0]!r} is not a file name inside the folder")
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InvalidModel(model_dir, f"index names missing shard(s): {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith(".") and f.name != "adapter_model.safetensors"]
    if not files:
        if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
            raise InvalidModel(
                model_dir, "only pickled weights (*.bin) found; they are not loaded",
                "convert with AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)",
            )
        raise InvalidModel(model_dir, "no *.safetensors weights found")
    return files


@dataclass
class Fingerprint:
    fingerprint: str
    files: dict[str, str] = field(default_factory=dict)  # file name -> plain sha256 hex
    tensors: dict[str, str] = field(default_factory=dict)  # tensor name -> digest
    num_tensors: int = 0
    num_parameters: int = 0
    total_bytes: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> parameter count
    architecture: str | None = None
    model_type: str | None = None
    name_or_path: str | None = None
    cached: bool = False

    @property
    def dtype(self) -> str | None:
        return max(self.dtypes, key=self.dtypes.get) if self.dtypes else None

    def to_dict(self, with_tensors: bool = False) -> dict:
        d = asdict(self)
        if not with_tensors:
            d.pop("tensors")
        d["dtype"] = self.dtype
        return d


def _hash_file(path: Path, file_hash: bool, progress=None) -> tuple[str | None, dict[str, str], dict]:
    """One sequential pass: the file's sha256 and every tensor's digest."""
    tensors, _ = read_header(path)
    order = sorted(tensors.values(), key=lambda t: t.start)
    fh_hash = hashlib.sha256() if file_hash else None
    hashers = {}
    digests: dict[str, str] = {}
    pos = 0
    idx = 0
    # The file hash runs in a second thread on the same chunk as the tensor digests
    # (hashlib drops the GIL), so hashing twice costs about one pass of wall time.
    side = ThreadPoolExecutor(1) if file_hash else None
    pending = None
    with open(path, "rb", buffering=0) as fh:
        if not file_hash and order:
            fh.seek(order[0].start)
            pos = order[0].start
        while True:
            chunk = fh.read(READ)
            if not chunk:
                break
            if pending is not None:
                pending.result()
            if side is not None:
                pending = side.submit(fh_hash.update, chunk)
            view = memoryview(chunk)
            cend = pos + len(chunk)
            # feed every tensor that overlaps [pos, cend)
            j = idx
            while j < len(order) and order[j].start < cend:
                t = order[j]
                if t.name in digests:
                    j += 1
                    continue
                lo, hi = max(t.start, pos), min(t.end, cend)
                if t.name not in hashers:
                    hashers[t.name] = hashlib.sha256(tensor_head(t.name, t.dtype, t.shape))
                if hi > lo:
                    hashers[t.name].update(view[lo - pos : hi - pos])
                if t.end <= cend:
                    digests[t.name] = hashers.pop(t.name).hexdigest()
                j += 1
            while idx < len(order) and order[idx].name in digests:
                idx += 1
            if progress is not None:
                progress(len(chunk))
            pos = cend
            if fh_hash is None and idx >= len(order):
                break
    if pending is not None:
        pending.result()
    if side is not None:
        side.shutdown()
    for t in order:
        if t.name in hashers:  # the file ended early
            raise InvalidModel(path, f"tensor {t.name} is cut short (truncated file?)")
        if t.name not in digests:  # zero-size tensors never overlap a chunk
            digests[t.name] = tensor_digest(t.name, t.dtype, t.shape, b"")
    return (fh_hash.hexdigest() if fh_hash else None), digests, tensors


def _stat_key(files: list[Path]) -> list:
    out = []
    for f in files:
        st = f.stat()
        out.append([f.name, st.st_size, st.st_mtime_ns])
    return out


def _cache_path(model_dir: Path) -> Path:
    from .paths import cache_dir

    key = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:32]
    return cache_dir() / "fingerprints" / f"{key}.json"


def cached_fingerprint(model_dir: str | Path) -> Fingerprint | None:
    """The cached fingerprint when files, sizes and mtimes are unchanged; else None."""
    model_dir = Path(model_dir)
    try:
        files = model_files(model_dir)
        data = json.loads(_cache_path(model_dir).read_text())
    except (OSError, ValueError, InvalidModel):
        return None
    if data.get("stat") != _stat_key(files) or data.get("version") != FORMAT_VERSION:
        return None
    fp = Fingerprint(**data["fingerprint"])
    fp.cached = True
    return fp


def store_fingerprint(model_dir: str | Path, fp: Fingerprint) -> None:
    from .fsutil import atomic_write_json

    model_dir = Path(model_dir)
    try:
        files = model_files(model_dir)
        d = asdict(fp)
        d["cached"] = False
        atomic_write_json(_cache_path(model_dir), {"version": FORMAT_VERSION, "stat": _stat_key(files),
                                                   "fingerprint": d}, fsync=False)
    except OSError:
        pass  # the cache is an optimisation, never a failure


def _model_info(model_dir: Path) -> tuple[str | None, str | None, str | None]:
    try:
        cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None, None
    if not isinstance(cfg, dict):  # a config from elsewhere: only well-typed strings are kept
        return None, None, None

    def text(v):
        return v if isinstance(v, str) and 0 < len(v) <= 1000 else None

    archs = cfg.get("architectures")
    arch = text(archs[0]) if isinstance(archs, list) and archs else None
    return arch, text(cfg.get("model_type")), text(cfg.get("_name_or_path"))


def fingerprint_model(model_dir: str | Path, use_cache: bool = True, file_hashes: bool = True,
                      progress: bool = False) -> Fingerprint:
    """Fingerprint a model folder (cached by real path, size and mtime)."""
    model_dir = Path(model_dir)
    if use_cache:
        fp = cached_fingerprint(model_dir)
        if fp is not None and (fp.files or not file_hashes):
            return fp
    files = model_files(model_dir)
    total = sum(f.stat().st_size for f in files)
    bar = None
    if progress:
        from .progress import bar as make_bar

        bar = make_bar(total=total, desc="fingerprint", unit="B", unit_scale=True)
    # hashlib releases the GIL on large buffers: one thread per file uses both cores
    workers = max(1, min(len(files), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda f: _hash_file(f, file_hashes, bar.update if bar else None), files))
    if bar:
        bar.close()
    fp = Fingerprint(fingerprint="")
    for f, (fhash, digests, tensors) in zip(files, results):
        if fhash:
            fp.files[f.name] = fhash
        for name, info in tensors.items():
            if name in fp.tensors:
                raise InvalidModel(model_dir, f"tensor {name} appears in more than one shard")
            fp.tensors[name] = digests[name]
            n = numel(info.shape)
            fp.num_parameters += n
            fp.dtypes[info.dtype] = fp.dtypes.get(info.dtype, 0) + n
            fp.total_bytes += info.end - info.start
    fp.num_tensors = len(fp.tensors)
    fp.fingerprint = combine(fp.tensors)
    fp.architecture, fp.model_type, fp.name_or_path = _model_info(model_dir)
    if fp.name_or_path is None:
        fp.name_or_path = str(model_dir.resolve())
    store_fingerprint(model_dir, fp)
    return fp


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open_input(path, buffering=0) as fh:  # never a symlink, FIFO or device
        while chunk := fh.read(READ):
            h.update(chunk)
    return h.hexdigest()
