"""`adapters remote list ORG`: the team's registry, read from a Hub (`adapters sync` is in sync.py).

Calls for a namespace of R repos holding V versions in all (measured against the
test Hub, see docs/team.md): one listing page per 1000 repos (it carries each repo's
head commit), one ``list_repo_refs`` per repo whose head changed since the last call (or
per repo with ``refresh``), and one download of ``adapterhub.json`` per commit never seen
before (each version's commit, and each repo's head for metrics logged after a push). The
files are cached by commit id, the refs by head commit (refs_cache.py says when refs may
be cached), so a second call on an unchanged namespace costs the listing alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..card import TOOL_TAG  # what our cards carry: plain PEFT repos are left out
from ..provenance import NAME as PROVENANCE_NAME
from .common import client, endpoint, resolve_token
from .errors import HubError
from .refs_cache import RefsCache, consistent
from .remote import ProvenanceCache, list_namespace, read_refs, team_fields, version_tag


@dataclass
class TeamListing:
    rows: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # repos skipped: what was wrong with them
    repos: dict = field(default_factory=dict)  # repo_id -> (refs, head team fields)
    downloads: int = 0
    listing_pages: int = 0
    refs_reads: int = 0

    @property
    def calls(self) -> dict[str, int]:
        """The Hub requests this listing made, by kind."""
        total = self.listing_pages + self.refs_reads + self.downloads
        return {"listing_pages": self.listing_pages, "refs_reads": self.refs_reads,
                "downloads": self.downloads, "total": total}


def _row(repo_id: str, n: int, commit: str, refs, fields: dict | None, later: dict) -> dict:
    f = fields or {}
    metrics = dict(f.get("metrics") or {})
    metrics.update(later.get(n, {}))
    return {"repo": repo_id, "version": n, "tag": version_tag(n), "commit_id": commit,
            "aliases": refs.aliases_of(commit), "base_fingerprint": f.get("base_fingerprint"),
            "metrics": metrics, "name": f.get("name"), "rank": f.get("rank"),
            "has_provenance": fields is not None}


class _Reader:
    """One repo's refs and head fields: from the refs cache when the listing's head is the one
    they were read at and they still agree with that head's adapterhub.json, else from the Hub."""

    def __init__(self, api, ep, tok, home, refresh: bool, out: TeamListing):
        self.api, self.ep, self.tok, self.refresh, self.out = api, ep, tok, refresh, out
        self.files, self.refs = ProvenanceCache(home), RefsCache(home)

    def head_fields(self, repo_id: str, head: str | None) -> dict | None:
        prov = self.files.get(self.api, self.ep, repo_id, head, self.tok) if head else None
        return team_fields(prov, f"{repo_id}/{PROVENANCE_NAME}") if prov else None

    def read(self, repo_id: str, listed_head: str | None):
        if not self.refresh and listed_head is not None:
            refs = self.refs.get(self.ep, repo_id, listed_head)
            if refs is not None:
                fields = self.head_fields(repo_id, refs.head)
                if consistent(refs, fields):
                    return refs, fields
        refs = read_refs(self.api, repo_id, self.ep, authenticated=self.tok is not None)
        self.out.refs_reads += 1
        fields = self.head_fields(repo_id, refs.head)
        if consistent(refs, fields):
            self.refs.put(self.ep, repo_id, refs)
        else:  # a tag still to come (or refs we did not make): read them again next time
            self.refs.drop(self.ep, repo_id)
        return refs, fields


def read_namespace(org: str, *, token: str | None = None, registry_home=None, refresh: bool = False) -> TeamListing:
    """Every version of every adapterhub-local repo in ``org``; a repo whose answers fail the
    checks is skipped and named in ``problems`` (one hostile repo does not hide the rest).
    ``refresh`` re-reads every repo's refs (tags made by other tools do not change the head)."""
    from ..paths import registry_home as home

    ep, tok = endpoint(), resolve_token(token)
    out = TeamListing()
    reader = _Reader(client(tok), ep, tok, home(registry_home), refresh, out)
    listing = list_namespace(org, ep, tok, TOOL_TAG)
    out.listing_pages = listing.pages
    for repo_id, listed_head in listing.heads.items():
        try:
            refs, head_fields = reader.read(repo_id, listed_head)
            later = (head_fields or {}).get("later_metrics") or {}
            rows = []
            for n, commit in sorted(refs.versions.items()):
                prov = reader.files.get(reader.api, ep, repo_id, commit, tok)
                fields = team_fields(prov, f"{repo_id}@{version_tag(n)}/{PROVENANCE_NAME}") if prov else None
                rows.append(_row(repo_id, n, commit, refs, fields, later))
        except HubError as e:
            out.problems.append(f"{repo_id}: {e}".replace("\n", " "))
            continue
        out.rows += rows
        out.repos[repo_id] = (refs, head_fields)
    out.downloads = reader.files.downloads
    return out


def filter_rows(rows: list[dict], *, where=(), base: str | None = None, sort: str | None = None) -> list[dict]:
    """--where / --base / --sort as `adapters list` means them, over the rows' metrics and
    their rank and version columns."""
    from ..registry.query import BadQuery, parse_where

    ops = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
           ">=": lambda a, b: a >= b, "=": lambda a, b: a == b, "!=": lambda a, b: a != b}

    def value(r, key):
        if key in ("rank", "version"):
            return r.get(key)
        if key == "name":
            return r["repo"]
        return r["metrics"].get(key)

    conds = parse_where(where) if where else []
    out = [r for r in rows if all((v := value(r, c.key)) is not None and ops[c.op](v, c.value) for c in conds)]
    if base:
        want = base if base.startswith("sha256:") else "sha256:" + base
        out = [r for r in out if (r["base_fingerprint"] or "").startswith(want)]
    if sort:
        key, desc = (sort[1:], True) if sort.startswith("-") else (sort, False)
        if key == "created":
            raise BadQuery("remote list cannot sort by created", "sort by a metric, name, version or rank")
        have = sorted((r for r in out if value(r, key) is not None), key=lambda r: value(r, key), reverse=desc)
        out = have + [r for r in out if value(r, key) is None]
    return out


def remote_list(org: str, *, where=(), base: str | None = None, sort: str | None = None,
                token: str | None = None, registry_home=None, refresh: bool = False) -> TeamListing:
    filter_rows([], where=where, base=base, sort=sort)  # a bad --where or --sort: one line, no request
    listing = read_namespace(org, token=token, registry_home=registry_home, refresh=refresh)
    listing.rows = filter_rows(listing.rows, where=where, base=base, sort=sort)
    return listing
