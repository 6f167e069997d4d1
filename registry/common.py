"""Names, hashes and file rules every registry module shares (a leaf: it imports no other
registry module), so the modules that implement Registry's methods need not import core."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timezone
from pathlib import Path

from .. import provenance as _prov
from ..errors import AdapterHubError

DB_NAME = "registry.db"
PROVENANCE_NAME = _prov.NAME  # what `export` writes; see adapterhub_local/provenance.py
# provenance files describe a version, they are not part of it (old exports wrote provenance.json)
PROVENANCE_NAMES = (_prov.NAME, _prov.EXPORT_NAME)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
REF_RE = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<version>\d+|latest)|:(?P<alias>[A-Za-z0-9][A-Za-z0-9._-]*))?$"
)
FP_RE = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")
SQLITE_MAGIC = b"SQLite format 3\x00"


class WeightsNotDownloaded(AdapterHubError):
    """A version recorded from its Hub repo's metadata (`adapters sync`) whose weights are not
    here: anything that needs the weights (export, merge, inspect, eval, push...) stops here."""

    def __init__(self, rec):
        o = getattr(rec, "origin", None) or {}
        self.ref = rec.ref
        self.source = f"{o['repo_id']}@{o.get('version') or o['commit_id']}" if o.get("repo_id") else None
        where = f", from {self.source}" if self.source else ""
        if self.source:
            hint = (f"download them: `adapters pull {self.source}`, or `adapters sync "
                    f"{o['repo_id'].split('/')[0]} --weights` for every such version")
        else:
            hint = "register the adapter's folder under this name to fill it in"
        super().__init__(f"{rec.ref} has no weights here (metadata only{where})", hint)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


VERSION_COLUMNS = ("adapter_id", "name", "version", "content_sha256", "base_fingerprint", "base_model", "rank",
                   "alpha", "targets", "num_parameters", "config", "size", "created_at", "note", "tags",
                   "provenance", "weights")


def insert_next_version(conn, adapter_id: int, row: dict) -> tuple[int, int]:
    """Take ``adapter_id``'s next version number and insert its ``versions`` row; returns
    (version id, number). The one place numbers are taken (register and sync's metadata-only
    records alike): inside the caller's write transaction, from ``adapters.last_version``, so a
    number is never reused, even after ``rm``. ``row`` holds the other columns by name."""
    unknown = set(row) - set(VERSION_COLUMNS)
    if unknown:
        raise ValueError(f"not a versions column: {sorted(unknown)}")
    number = conn.execute("SELECT last_version FROM adapters WHERE id = ?", (adapter_id,)).fetchone()[0] + 1
    conn.execute("UPDATE adapters SET last_version = ? WHERE id = ?", (number, adapter_id))
    cols = {**row, "adapter_id": adapter_id, "version": number}
    names = [c for c in VERSION_COLUMNS if c in cols]
    version_id = conn.execute(f"INSERT INTO versions ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                              tuple(cols[c] for c in names)).lastrowid
    return version_id, number


def check_name(name: str, what: str = "adapter name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or name.isdigit():
        raise AdapterHubError(
            f"bad {what} {name!r}",
            "use letters, digits, '.', '_' and '-' (no '/', '@' or ':'), starting with a letter or digit",
        )
    if what == "alias" and name == "latest":
        raise AdapterHubError("'latest' is reserved: name:latest always means the newest version")
    return name


def normalize_fingerprint(fp: str) -> str:
    m = FP_RE.match(fp.strip().lower()) if isinstance(fp, str) else None
    if not m:
        raise AdapterHubError(f"bad base fingerprint {fp!r}",
                              "expected sha256:<64 hex digits>, as `adapters fingerprint MODEL_DIR` prints")
    return "sha256:" + m.group(1)


def content_hash(manifest: dict[str, tuple[str, int]]) -> str:
    h = hashlib.sha256(b"adapterhub-version-v1\n")
    for name in sorted(manifest):
        h.update(f"{name}\0{manifest[name][0]}\n".encode())
    return h.hexdigest()


# Training leftovers that sit beside adapters (HF Trainer checkpoints) and pickles we never
# load: not part of a version. Subfolders (checkpoint-500/, runs/) are not either.
SKIP_FILES = re.compile(r"^(optimizer\.pt|scheduler\.pt|rng_state.*\.pth|training_args\.bin|"
                        r"adapter_model\.bin|trainer_state\.json)$")


def adapter_files(folder: Path, skipped: list | None = None) -> dict[str, Path]:
    """Files that make up a version: the folder's regular, non-hidden top-level files,
    minus training leftovers and the provenance files (adapterhub.json, an old export's
    provenance.json: they describe the version, they are not part of it). Names left out
    are appended to ``skipped``."""
    from ..fsutil import check_folder

    check_folder(folder, "adapter folder")  # a symlink (README.md -> ~/.ssh/id_rsa) is never stored
    out = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.name in PROVENANCE_NAMES:
            continue
        if not p.is_file() or SKIP_FILES.match(p.name):
            if skipped is not None:
                skipped.append(p.name + ("/" if p.is_dir() else ""))
            continue
        out[p.name] = p
    return out
