"""What a merge reads: adapters resolved from registry references or folders.

Each input remembers how the user named it (a registry reference such as
``support@3`` or a path), the content hashes of its two files (so a recipe can
prove it replays the same bytes), its weight, and the base-model fingerprint
it expects: a registry version's ``base_fingerprint``, else the
``adapterhub.json`` provenance file of an exported folder (adapterhub_local/provenance.py),
else unknown.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AdapterHubError
from ..fingerprint import file_sha256
from ..peft_format import CONFIG_NAME, WEIGHTS_NAME, LoraAdapter, load_adapter


@dataclass
class MergeInput:
    ref: str  # canonical: "name@3" for registry versions, the path as given otherwise
    folder: Path
    adapter: LoraAdapter
    weight: float = 1.0
    record: object | None = None  # registry VersionRecord
    base_fingerprint: str | None = None
    # file name -> sha256 hex; or, while the files are hashed in the background, its Future
    _files: dict[str, str] | Future = field(default_factory=dict, repr=False)

    @property
    def files(self) -> dict[str, str]:
        if isinstance(self._files, Future):
            try:
                self._files = self._files.result()
            except OSError as e:  # the folder changed under the merge: say which input, not the output
                raise AdapterHubError(f"{e.filename or self.folder}: cannot read ({e.strerror or e})") from None
        return self._files

    @property
    def label(self) -> str:
        return self.ref

    def to_recipe(self) -> dict:
        ref = self.ref if self.record is not None else str(Path(self.folder).resolve())
        d = {"ref": ref, "weight": self.weight,
             "sha256": {k: self.files[k] for k in sorted(self.files)}}
        if self.base_fingerprint:
            d["base_fingerprint"] = self.base_fingerprint
        return d


def parse_weights(text: str | None, n: int, default: float = 1.0) -> list[float]:
    """``"0.7,0.3"`` -> [0.7, 0.3]; one weight per input."""
    if text is None or str(text).strip() == "":
        return [default] * n
    if isinstance(text, (list, tuple)):
        parts = list(text)
    else:
        parts = [p for p in str(text).replace(" ", "").split(",") if p != ""]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise AdapterHubError(f"--weights {text!r}: expected numbers separated by commas, e.g. 0.7,0.3") from None
    if len(weights) != n:
        raise AdapterHubError(f"--weights gives {len(weights)} weight(s) for {n} adapter(s)",
                              "give one weight per adapter, in the same order")
    for w in weights:
        if not math.isfinite(w):
            raise AdapterHubError(f"--weights {text!r}: weights must be finite numbers")
    return weights


def _file_hashes(folder: Path) -> dict[str, str]:
    return {name: file_sha256(folder / name) for name in (CONFIG_NAME, WEIGHTS_NAME) if (folder / name).is_file()}


_hashing: ThreadPoolExecutor | None = None


def _file_hashes_later(folder: Path) -> Future:
    """The files' hashes, computed on one background thread: a merge into a base needs them
    only for the recipe it writes at the end, so hashing eight adapters (~0.25 s of CPU)
    overlaps the merge instead of delaying its start."""
    global _hashing
    if _hashing is None:
        _hashing = ThreadPoolExecutor(1, thread_name_prefix="adapter-hash")
    return _hashing.submit(_file_hashes, folder)


def provenance_fingerprint(folder: Path) -> str | None:
    """The base fingerprint the folder's provenance file records (any shape ever written:
    see adapterhub_local/provenance.py); a file we cannot accept is an error, not ignored."""
    from .. import provenance

    return provenance.base_fingerprint(provenance.read(folder))


def resolve_input(ref: str, weight: float = 1.0, registry_home=None) -> MergeInput:
    """One adapter, its factors as float32 numpy arrays (no torch: the algebra turns them into
    tensors itself, without a copy)."""
    from ..refs import resolve_adapter

    folder, record = resolve_adapter(str(ref), registry_home)
    return _load_input(str(ref), Path(folder), record, weight)


def _load_input(ref: str, folder: Path, record, weight: float) -> MergeInput:
    adapter = load_adapter(folder)
    if record is not None:
        files = dict(getattr(record, "files", None) or {}) or _file_hashes(folder)
        files = {k: v for k, v in files.items() if k in (CONFIG_NAME, WEIGHTS_NAME)} or _file_hashes(folder)
        return MergeInput(ref=record.ref, folder=folder, adapter=adapter, weight=weight, record=record,
                          base_fingerprint=getattr(record, "base_fingerprint", None)
                          or provenance_fingerprint(folder), _files=files)
    return MergeInput(ref=ref, folder=folder, adapter=adapter, weight=weight,
                      base_fingerprint=provenance_fingerprint(folder), _files=_file_hashes_later(folder))


def resolve_inputs(refs, weights: list[float] | None = None, registry_home=None) -> list[MergeInput]:
    refs = [str(r) for r in refs]
    if not refs:
        raise AdapterHubError("no adapters given", "name at least one REF (registry reference or PEFT folder)")
    weights = weights if weights is not None else [1.0] * len(refs)
    if len(refs) == 1:
        return [resolve_input(r, w, registry_home) for r, w in zip(refs, weights)]
    # numpy loading and hashing release the GIL: load several adapters at once, one per core
    # (references are resolved first, one by one: the registry may check a version out)
    from ..refs import resolve_adapter

    located = [resolve_adapter(r, registry_home) for r in refs]
    with ThreadPoolExecutor(min(len(refs), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda i: _load_input(refs[i], Path(located[i][0]), located[i][1], weights[i]),
                             range(len(refs))))


def check_hashes(inp: MergeInput, expected: dict[str, str]) -> None:
    """Refuse to replay a recipe whose input bytes changed."""
    for name, digest in (expected or {}).items():
        have = inp.files.get(name)
        if have is not None and have != digest:
            raise AdapterHubError(
                f"{inp.ref}: {name} has sha256 {have[:12]}…, the recipe recorded {digest[:12]}…",
                "the input changed since the recipe was written; replaying it would not give the same output",
            )
