"""A repo's refs (main's head, version tags, aliases), cached by its head commit, so that a
second ``remote list`` of an unchanged namespace costs the listing alone.

A tag can be created or moved without a new commit, so an unchanged head proves nothing by
itself. What makes it enough is that adapterhub-local never changes a repo's tags from a
state it would cache without first committing a new head:

- a push commits its version N (``team.version`` in adapterhub.json) before it tags vN;
- ``remote alias`` commits the alias table (``team.aliases``: alias -> vN) before it moves
  the tag (hub/team.py ``set_alias``).

So refs are cached only when they are exactly what the head's adapterhub.json says they are
(a head without one is never cached: there is no table to commit, and `remote alias` moves the
tag alone):
the version the head claims is tagged, every alias tag is in the head's alias table pointing
at that version's commit (and the other way round), and there is no tag we would ignore. In
the window between a commit and its tag the two disagree, so nothing is cached there; once
the tag exists they agree, and the next change needs a new commit, hence a new head. Tags made
by other tools (a raw ``create_tag``) on a repo whose refs were cached are not seen until
``remote list --refresh`` re-reads them.

The cache file is ours but never trusted: anything that is not exactly the expected shape
(JSON object, these keys, 40-hex commit ids, names we could have created, this endpoint, this
repo, this head) is ignored and the refs are read from the Hub again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..fsutil import atomic_write_bytes
from .common import COMMIT_RE, REF_NAME_RE
from .remote import MAX_TAGS, VERSION_LIKE, VERSION_TAG, RepoRefs

FORMAT = "adapterhub-local/refs-cache"
FORMAT_VERSION = 1
MAX_BYTES = 2 << 20  # MAX_TAGS tags of at most 128 + 40 characters fit in well under this


def consistent(refs: RepoRefs, head_fields: dict | None) -> bool:
    """Do the refs say exactly what the head's adapterhub.json says (see module doc)?"""
    if refs.head is None or refs.ignored or head_fields is None:
        return False  # no adapterhub.json at the head: `remote alias` moves a tag there without a commit
    fields = head_fields
    k = fields.get("version")
    if k is not None and k not in refs.versions:
        return False  # a version commit whose tag is not created yet (or never will be: a crash)
    table = fields.get("aliases") or {}
    if set(table) != set(refs.aliases):
        return False
    return all(refs.versions.get(n) == refs.aliases[a] for a, n in table.items())


def _commit(v) -> bool:
    return isinstance(v, str) and COMMIT_RE.match(v) is not None


class RefsCache:
    """One file per (endpoint, repo) under ``<home>/hub-cache/refs/``: the last consistent
    refs read, with the head they belong to."""

    def __init__(self, home: Path | None):
        self.root = Path(home) / "hub-cache" / "refs" if home is not None else None

    def _path(self, ep: str, repo_id: str) -> Path | None:
        if self.root is None:
            return None
        key = hashlib.sha256(f"{ep}\0{repo_id}".encode()).hexdigest()
        return self.root / f"{key}.json"

    def get(self, ep: str, repo_id: str, head: str) -> RepoRefs | None:
        """The cached refs of ``repo_id`` when they were read at ``head``; None otherwise (no
        file, another head, or a file that is not exactly what ``put`` writes)."""
        path = self._path(ep, repo_id)
        if path is None or not _commit(head):
            return None
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_BYTES + 1)
            if len(data) > MAX_BYTES:
                return None
            doc = json.loads(data)
        except (OSError, ValueError, RecursionError):
            return None
        return _parse(doc, ep, repo_id, head)

    def put(self, ep: str, repo_id: str, refs: RepoRefs) -> None:
        """Keep ``refs`` (temp file + rename: a reader sees the old file or the new one)."""
        path = self._path(ep, repo_id)
        if path is None or refs.head is None:
            return
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "endpoint": ep, "repo_id": repo_id,
               "head": refs.head, "versions": {str(n): c for n, c in sorted(refs.versions.items())},
               "aliases": dict(sorted(refs.aliases.items()))}
        try:
            atomic_write_bytes(path, json.dumps(doc, indent=1).encode(), fsync=False)
        except OSError:
            pass  # a cache we cannot write costs a refs call next time, nothing more

    def drop(self, ep: str, repo_id: str) -> None:
        """Forget the repo's refs (read again and found not cacheable: an older entry must not
        be reused either)."""
        path = self._path(ep, repo_id)
        if path is not None:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass


def _parse(doc, ep: str, repo_id: str, head: str) -> RepoRefs | None:
    if not isinstance(doc, dict) or set(doc) != {"format", "format_version", "endpoint", "repo_id", "head",
                                                  "versions", "aliases"}:
        return None
    if doc["format"] != FORMAT or doc["format_version"] != FORMAT_VERSION or doc["endpoint"] != ep \
            or doc["repo_id"] != repo_id or doc["head"] != head:
        return None
    versions, aliases = doc["versions"], doc["aliases"]
    if not isinstance(versions, dict) or not isinstance(aliases, dict) or len(versions) + len(aliases) > MAX_TAGS:
        return None
    out = RepoRefs(repo_id=repo_id, head=head)
    for key, commit in versions.items():
        m = VERSION_TAG.match(f"v{key}") if isinstance(key, str) and key.isascii() else None
        if not m or not _commit(commit) or str(int(m.group(1))) != key:
            return None
        out.versions[int(m.group(1))] = commit
    for name, commit in aliases.items():
        if not isinstance(name, str) or not REF_NAME_RE.match(name) or VERSION_LIKE.match(name) \
                or not _commit(commit):
            return None
        out.aliases[name] = commit
    return out
