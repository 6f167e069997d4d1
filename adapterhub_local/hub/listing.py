"""`adapters remote list ORG`: the team's registry, read from a Hub (`adapters sync` is in sync.py).

Calls for a namespace of R repos holding V versions in all (measured against the
test Hub, see docs/team.md): one listing page per 1000 repos, one ``list_repo_refs``
per repo, and one download of ``adapterhub.json`` per commit never seen before (each
version's commit, and each repo's head for metrics logged after a push). Those
files are cached by commit id, so a second call costs the listing and the refs only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..card import TOOL_TAG  # what our cards carry: plain PEFT repos are left out
from ..provenance import NAME as PROVENANCE_NAME
from .common import client, endpoint, resolve_token
from .errors import HubError
from .remote import ProvenanceCache, list_team_repos, read_refs, team_fields, version_tag


@dataclass
class TeamListing:
    rows: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # repos skipped: what was wrong with them
    repos: dict = field(default_factory=dict)  # repo_id -> (refs, head team fields)
    downloads: int = 0


def _row(repo_id: str, n: int, commit: str, refs, fields: dict | None, later: dict) -> dict:
    f = fields or {}
    metrics = dict(f.get("metrics") or {})
    metrics.update(later.get(n, {}))
    return {"repo": repo_id, "version": n, "tag": version_tag(n), "commit_id": commit,
            "aliases": refs.aliases_of(commit), "base_fingerprint": f.get("base_fingerprint"),
            "metrics": metrics, "name": f.get("name"), "rank": f.get("rank"),
            "has_provenance": fields is not None}


def read_namespace(org: str, *, token: str | None = None, registry_home=None) -> TeamListing:
    """Every version of every adapterhub-local repo in ``org``; a repo whose answers fail the
    checks is skipped and named in ``problems`` (one hostile repo does not hide the rest)."""
    from ..paths import registry_home as home

    ep, tok = endpoint(), resolve_token(token)
    api = client(tok)
    cache = ProvenanceCache(home(registry_home))
    out = TeamListing()
    for repo_id in list_team_repos(api, org, ep, TOOL_TAG):
        try:
            refs = read_refs(api, repo_id, ep, authenticated=tok is not None)
            head = cache.get(api, ep, repo_id, refs.head, tok) if refs.head else None
            head_fields = team_fields(head, f"{repo_id}/{PROVENANCE_NAME}") if head else None
            later = (head_fields or {}).get("later_metrics") or {}
            rows = []
            for n, commit in sorted(refs.versions.items()):
                prov = cache.get(api, ep, repo_id, commit, tok)
                fields = team_fields(prov, f"{repo_id}@{version_tag(n)}/{PROVENANCE_NAME}") if prov else None
                rows.append(_row(repo_id, n, commit, refs, fields, later))
        except HubError as e:
            out.problems.append(f"{repo_id}: {e}".replace("\n", " "))
            continue
        out.rows += rows
        out.repos[repo_id] = (refs, head_fields)
    out.downloads = cache.downloads
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
                token: str | None = None, registry_home=None) -> TeamListing:
    listing = read_namespace(org, token=token, registry_home=registry_home)
    listing.rows = filter_rows(listing.rows, where=where, base=base, sort=sort)
    return listing
