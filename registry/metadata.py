"""Versions recorded from a Hub repo's metadata, their weights not downloaded (`adapters sync ORG`).

A metadata-only version is a ``versions`` row with ``weights = 'metadata'``, no
``version_files`` rows and no blobs. It holds what the repo's ``adapterhub.json`` says at
that version's commit: base fingerprint, rank, alpha, targets, lineage, metrics (kept as
the repo's claims, as `pull` keeps them), its origin (repo, ``vN``, commit) and a content
hash computed from the file hashes ``adapterhub.json`` lists. ``register`` of bytes with
that content hash under the same name (which is what `pull` does) fills it in: same
record, same ref. Until then ``adapter_path`` and ``export`` refuse it
(:class:`~.common.WeightsNotDownloaded`).
"""

from __future__ import annotations

from ..errors import AdapterNotFound
from .common import check_name, content_hash, insert_next_version, normalize_fingerprint, now
from .query import check_metrics
from .records import VersionRecord, dumps

MAX_PARENTS = 100


def record_metadata(self, name: str, *, files: dict[str, str], origin: dict, base_fingerprint: str | None = None,
                    rank: int | None = None, alpha: float | None = None, targets=(), num_parameters: int | None = None,
                    base_model: str | None = None, note: str | None = None, provenance: dict | None = None,
                    parents=(), claims: dict | None = None) -> VersionRecord:
    """Record a version of ``name`` from its Hub metadata, in one transaction (row, origin, Hub
    row, claimed metrics, lineage), without weights.

    ``files``: {file name: sha256} of the files a pull registers; ``origin``: {endpoint,
    repo_id, version ("vN"), commit_id}. When this registry already holds that version (a
    row from the same origin commit, or a version of ``name`` with this content) it is
    returned with ``is_new=False`` and only its Hub row is added, as a pull would.
    """
    check_name(name)
    if not files:
        raise ValueError("a metadata-only version needs the file hashes its repo lists")
    content = content_hash({fn: (sha, 0) for fn, sha in files.items()})
    fp = normalize_fingerprint(base_fingerprint) if base_fingerprint else None
    claims = check_metrics(claims)
    ep, repo_id, tag, commit = origin["endpoint"], origin["repo_id"], origin.get("version"), origin["commit_id"]
    links = []
    for parent in list(parents)[:MAX_PARENTS]:
        try:
            p = self.resolve(parent)
            links.append((p.ref, p.id))
        except AdapterNotFound:
            continue
    stamp = now()
    with self._write() as conn:
        row = conn.execute("SELECT version_id FROM origins WHERE endpoint = ? AND repo_id = ? AND commit_id = ?",
                           (ep, repo_id, commit)).fetchone()
        adapter = conn.execute("SELECT id FROM adapters WHERE name = ?", (name,)).fetchone()
        if row is None and adapter is not None:
            row = conn.execute("SELECT id FROM versions WHERE adapter_id = ? AND content_sha256 = ? "
                               "ORDER BY version DESC LIMIT 1", (adapter[0], content)).fetchone()
        if row is not None:  # already here (synced by another process, pushed from here, registered)
            version_id = row[0]
            if not conn.execute("SELECT 1 FROM hub WHERE version_id = ? AND repo_id = ? AND commit_id = ?",
                                (version_id, repo_id, commit)).fetchone():
                conn.execute("INSERT INTO hub (version_id, repo_id, revision, commit_id, pushed_at) "
                             "VALUES (?, ?, ?, ?, ?)", (version_id, repo_id, tag, commit, stamp))
            is_new = False
        else:
            if adapter is None:
                adapter_id = conn.execute("INSERT INTO adapters (name, last_version, created_at) VALUES (?, 0, ?)",
                                          (name, stamp)).lastrowid
            else:
                adapter_id = adapter[0]
            version_id, _ = insert_next_version(conn, adapter_id, {
                "name": name, "content_sha256": content, "base_fingerprint": fp, "base_model": base_model,
                "rank": rank, "alpha": alpha, "targets": dumps(list(targets)), "num_parameters": num_parameters,
                "config": dumps({}), "size": 0, "created_at": stamp, "note": note, "tags": dumps({}),
                "provenance": dumps(provenance or {}), "weights": "metadata"})
            conn.executemany("INSERT OR IGNORE INTO lineage (child_id, parent_ref, parent_id) VALUES (?, ?, ?)",
                             [(version_id, ref, pid) for ref, pid in links])
            conn.execute("INSERT INTO origins (version_id, endpoint, repo_id, version, commit_id, pulled_at) "
                         "VALUES (?, ?, ?, ?, ?, ?)", (version_id, ep, repo_id, tag, commit, stamp))
            conn.execute("INSERT INTO hub (version_id, repo_id, revision, commit_id, pushed_at) VALUES (?, ?, ?, ?, ?)",
                         (version_id, repo_id, tag, commit, stamp))
            source = f"{repo_id}@{tag or commit[:12]}"
            conn.executemany("INSERT INTO claimed_metrics (version_id, key, value, source, received_at) "
                             "VALUES (?, ?, ?, ?, ?)", [(version_id, k, v, source, stamp) for k, v in claims.items()])
            is_new = True
    return self.get(version_id, is_new=is_new)


def find_origin(self, endpoint: str, repo_id: str, *, commit_id: str | None = None,
                version: str | None = None) -> list[VersionRecord]:
    """Versions pulled or synced from ``repo_id`` on ``endpoint`` at this commit, or recorded as
    this version tag (oldest first)."""
    rows = self._q("SELECT version_id FROM origins WHERE endpoint = ? AND repo_id = ? AND "
                   "(commit_id = ? OR version = ?) ORDER BY version_id", (endpoint, repo_id, commit_id, version))
    return [self.get(r["version_id"]) for r in rows]
