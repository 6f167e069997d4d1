"""The registry: one SQLite file (WAL) plus a content-addressed blob store.

Write order everywhere: blobs first (temp, fsync, rename), rows second, in one
``BEGIN IMMEDIATE`` transaction that also takes the next version number. A crash
at any point leaves at most orphan blobs, which ``verify`` reports and ``gc`` removes.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import os
import sqlite3
from pathlib import Path

from ..errors import AdapterHubError, AdapterNotFound, RegistryError
from .blobs import BlobCorrupt, BlobStore, sha256_file
from .common import (  # noqa: F401 - re-exported: callers import them from core
    DB_NAME,
    FP_RE,
    NAME_RE,
    PROVENANCE_NAME,
    PROVENANCE_NAMES,
    REF_RE,
    SKIP_FILES,
    SQLITE_MAGIC,
    adapter_files,
    check_name,
    content_hash,
    normalize_fingerprint,
    now,
)
from .query import build_list_query
from .records import VersionRecord, loads, record_from_row


class NotRegistered(AdapterNotFound):
    """A folder given as REF whose exact bytes are no version in this registry."""

    def __init__(self, path):
        self.ref = str(path)
        self.close = []
        AdapterHubError.__init__(self, f"{path}: these exact files are not a registered version",
                                 "register it with `adapters register DIR --name NAME`")


def _dict_rows(cursor, row):
    return {d[0]: v for d, v in zip(cursor.description, row)}


class Registry:
    """Open with :func:`open_registry`. Safe to use from many processes at once."""

    def __init__(self, home: str | os.PathLike):
        self.home = Path(home).expanduser()
        self.db_path = self.home / DB_NAME
        self.blobs = BlobStore(self.home / "blobs")
        self.checkouts = self.home / "checkouts"
        self._lock_fh = None
        self._open()

    # -- connection and schema -------------------------------------------------
    def _open(self) -> None:
        from .schema import KNOWN, check_ours, migrations

        if self.home.exists() and not self.home.is_dir():
            raise RegistryError(f"{self.home}: registry home is not a directory")
        if self.db_path.exists():
            if not self.db_path.is_file():
                raise RegistryError(f"{self.db_path}: not a file")
            with open(self.db_path, "rb") as fh:
                head = fh.read(16)
            if head and head != SQLITE_MAGIC:
                raise RegistryError(f"{self.db_path}: not an SQLite database",
                                    "point --registry / $ADAPTERS_HOME at a registry folder")
        try:
            self.home.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RegistryError(f"{self.home}: cannot create registry home ({e.strerror})") from None
        self.conn = sqlite3.connect(str(self.db_path), timeout=60.0)
        try:
            self.conn.execute("PRAGMA busy_timeout = 60000")
            self.conn.execute("PRAGMA foreign_keys = ON")
            # WAL + NORMAL: a crash never corrupts; a power cut may drop the last commit,
            # which (blobs being fsynced first) leaves at most orphan blobs.
            self.conn.execute("PRAGMA synchronous = NORMAL")
            check_ours(self.conn, self.db_path)  # before any write: other apps' databases stay as they are
            applied = migrations.applied(self.conn)
            unknown = sorted(set(applied) - set(KNOWN))
            if unknown:
                raise RegistryError(
                    f"{self.db_path}: schema {unknown[-1]} is newer than this adapterhub-local "
                    f"understands (it knows up to {KNOWN[-1]})", "upgrade adapterhub-local to use it")
            if len(applied) < len(KNOWN):
                self._migrate(migrations)
        except sqlite3.DatabaseError as e:
            self.conn.close()
            raise RegistryError(f"{self.db_path}: cannot open the registry database ({e})") from None
        except BaseException:
            self.conn.close()
            raise
        self.blobs.root.mkdir(parents=True, exist_ok=True)

    def _migrate(self, migrations) -> None:
        # Several processes may open a fresh registry at once: one migrates, the rest wait.
        with open(self.home / ".migrate.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    self.conn.execute("PRAGMA journal_mode = WAL")
                migrations.apply(self.conn)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def close(self) -> None:
        self.conn.close()
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextlib.contextmanager
    def _write(self):
        """One write transaction holding SQLite's write lock from its first statement.

        Writers of this library queue on an flock first: the kernel wakes the next
        one the moment the lock is free, where SQLite's busy handler would poll with
        growing sleeps (8 concurrent registrars ran ~5x slower that way).
        """
        if self._lock_fh is None:
            self._lock_fh = open(self.home / ".write.lock", "a+")
        fcntl.flock(self._lock_fh, fcntl.LOCK_EX)
        try:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:  # another tool (sqlite3 shell) holds it past the timeout
                raise RegistryError(f"{self.db_path}: database is locked ({e})") from None
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        finally:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)

    def _q(self, sql: str, params=()) -> list[dict]:
        cur = self.conn.cursor()
        cur.row_factory = _dict_rows
        return cur.execute(sql, params).fetchall()

    def _one(self, sql: str, params=()) -> dict | None:
        rows = self._q(sql, params)
        return rows[0] if rows else None

    # -- references -------------------------------------------------------------
    def names(self) -> list[str]:
        return [r["name"] for r in self._q("SELECT DISTINCT name FROM versions ORDER BY name")]

    def resolve(self, ref) -> VersionRecord:
        """``name`` (latest), ``name@3``, ``name:prod``, ``name:latest``, a VersionRecord, or
        the path of a folder whose exact bytes are registered."""
        if isinstance(ref, VersionRecord):
            return self.get(ref.id)
        ref = str(ref).strip()
        m = REF_RE.match(ref)
        if not m:
            path = Path(ref).expanduser()
            if path.is_dir():
                found = self.find_by_content(path)
                if found:
                    return found[-1]
                raise NotRegistered(path)
            raise AdapterNotFound(ref, self._close_names(ref.split("@")[0].split(":")[0]))
        name, version, alias = m.group("name"), m.group("version"), m.group("alias")
        if alias and alias != "latest":
            row = self._one("SELECT a.version_id FROM aliases a JOIN adapters d ON d.id = a.adapter_id "
                            "WHERE d.name = ? AND a.alias = ?", (name, alias))
            if row is None:
                have = self._q("SELECT a.alias FROM aliases a JOIN adapters d ON d.id = a.adapter_id "
                               "WHERE d.name = ? ORDER BY a.alias", (name,))
                close = [f"{name}:{r['alias']}" for r in have] if have else self._close_names(name)
                raise AdapterNotFound(ref, close)
            return self.get(row["version_id"])
        if version and version != "latest":
            row = self._one("SELECT id FROM versions WHERE name = ? AND version = ?", (name, int(version)))
        else:
            row = self._one("SELECT id FROM versions WHERE name = ? ORDER BY version DESC LIMIT 1", (name,))
        if row is None:
            have = self._q("SELECT version FROM versions WHERE name = ? ORDER BY version DESC LIMIT 5", (name,))
            close = [f"{name}@{r['version']}" for r in have] if have else self._close_names(name)
            raise AdapterNotFound(ref, close)
        return self.get(row["id"])

    def _close_names(self, name: str) -> list[str]:
        names = self.names()
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        close += [n for n in names if name and n.startswith(name) and n not in close][: 3 - len(close)]
        return close

    def find_by_content(self, folder: str | os.PathLike) -> list[VersionRecord]:
        """Registered versions holding exactly the files of ``folder`` (oldest first)."""
        files = adapter_files(Path(folder))
        manifest = {rel: (sha256_file(p)[0], 0) for rel, p in files.items()}
        rows = self._q("SELECT id FROM versions WHERE content_sha256 = ? ORDER BY id", (content_hash(manifest),))
        return [self.get(r["id"]) for r in rows]

    # -- records ----------------------------------------------------------------
    def get(self, version_id: int, is_new: bool = True) -> VersionRecord:
        row = self._one("SELECT * FROM versions WHERE id = ?", (version_id,))
        if row is None:
            raise AdapterNotFound(f"#{version_id}")
        recs = self._records([row])
        recs[0].is_new = is_new
        return recs[0]

    def _records(self, rows: list[dict], full: bool = True) -> list[VersionRecord]:
        """Rows -> records with files, metrics, aliases, lineage and hub, in a few batched queries."""
        if not rows:
            return []
        ids = [r["id"] for r in rows]
        marks = ",".join("?" * len(ids))
        by: dict[str, dict[int, list]] = {k: {i: [] for i in ids} for k in
                                          ("files", "metrics", "aliases", "parents", "children", "hub")}
        for f in self._q(f"SELECT * FROM version_files WHERE version_id IN ({marks}) ORDER BY filename", ids):
            by["files"][f["version_id"]].append(f)
        for m in self._q(f"SELECT * FROM metric_values WHERE version_id IN ({marks}) ORDER BY key", ids):
            by["metrics"][m["version_id"]].append(m)
        for a in self._q(f"SELECT version_id, alias FROM aliases WHERE version_id IN ({marks}) ORDER BY alias", ids):
            by["aliases"][a["version_id"]].append(a["alias"])
        if full:
            for e in self._q(f"SELECT child_id, parent_ref FROM lineage WHERE child_id IN ({marks}) "
                             "ORDER BY rowid", ids):
                by["parents"][e["child_id"]].append(e["parent_ref"])
            for e in self._q(f"SELECT l.parent_id, v.name, v.version FROM lineage l JOIN versions v "
                             f"ON v.id = l.child_id WHERE l.parent_id IN ({marks}) ORDER BY v.id", ids):
                by["children"][e["parent_id"]].append(f"{e['name']}@{e['version']}")
            self._claims_into(by, ids, marks)
            for h in self._q(f"SELECT * FROM hub WHERE version_id IN ({marks}) ORDER BY id", ids):
                by["hub"][h["version_id"]].append(
                    {"repo_id": h["repo_id"], "revision": h["revision"], "commit_id": h["commit_id"],
                     "pushed_at": h["pushed_at"]})
        out = []
        for row in rows:
            rec = record_from_row(row, by["files"][row["id"]])
            rec.metrics = {m["key"]: m["value"] for m in by["metrics"][row["id"]]}
            rec.aliases = by["aliases"][row["id"]]
            rec.parents = by["parents"][row["id"]]
            rec.children = by["children"][row["id"]]
            rec.hub = by["hub"][row["id"]]
            rec.origin = by.get("origin", {}).get(row["id"])
            claims = by.get("claims", {}).get(row["id"]) or []
            rec.claims = {c["key"]: c["value"] for c in claims}
            rec.claims_source = claims[0]["source"] if claims else None
            out.append(rec)
        return out

    def list(self, *, name=None, base=None, alias=None, where=(), sort=None, descending=None,
             limit: int | None = 50, latest_only: bool = False) -> list[VersionRecord]:
        """Versions matching every filter; newest first unless ``sort`` says otherwise.

        ``where``: conditions like ``"eval_loss<1.2"`` (also ``rank``, ``alpha``, ``size``,
        ``version``); ``sort``: a metric or column, ``-key`` for descending; ``base``: a
        fingerprint (or its prefix), a base model's name or path, or a model folder.
        """
        if base and Path(base).expanduser().is_dir():
            from ..fingerprint import fingerprint_model

            base = fingerprint_model(Path(base).expanduser(), progress=True).fingerprint
        sql, params = build_list_query(name=name, base=base, alias=alias, where=where, sort=sort,
                                       descending=descending, limit=limit, latest_only=latest_only)
        ids = [r["id"] for r in self._q(sql, params)]
        if not ids:
            return []
        rows = {r["id"]: r for r in self._q(
            f"SELECT * FROM versions WHERE id IN ({','.join('?' * len(ids))})", ids)}
        return self._records([rows[i] for i in ids])

    def base_model(self, fingerprint: str) -> dict | None:
        row = self._one("SELECT * FROM base_models WHERE fingerprint = ?", (fingerprint,))
        if row:
            row["files"] = loads(row["files"], {})
            row.pop("shapes", None)
        return row

    def base_models(self) -> list[dict]:
        rows = self._q("SELECT fingerprint, name_or_path, source, architecture, model_type, dtype, "
                       "num_parameters, num_tensors, total_bytes, files, created_at FROM base_models "
                       "ORDER BY created_at")
        for r in rows:
            r["files"] = loads(r["files"], {})
        return rows

    # -- the rest of the API lives in small modules, bound here ------------------
    from .annotate import alias_sources, log_metrics, metric_history, remove_alias, set_alias, set_hub
    from .claims import _claims_into, add_claims, set_origin
    from .lineage import lineage, merge, merges_for, record_merge, set_merge_output
    from .metadata import find_origin, record_metadata
    from .register import _base_info, register
    from .storage import adapter_path, export, gc, rm, verify


def open_registry(home: str | os.PathLike | None = None) -> Registry:
    """The registry at ``home`` (else ``$ADAPTERS_HOME``, else the XDG data dir), created on first use."""
    from ..paths import registry_home

    return Registry(registry_home(home))


__all__ = [
    "PROVENANCE_NAME",
    "BlobCorrupt",
    "NotRegistered",
    "Registry",
    "VersionRecord",
    "adapter_files",
    "check_name",
    "content_hash",
    "normalize_fingerprint",
    "now",
    "open_registry",
]
