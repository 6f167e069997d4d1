"""`adapters remote list ORG` and `adapters sync ORG`: the team's registry, read from a Hub.

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


# -- sync --------------------------------------------------------------------------------

def _local_index(reg) -> dict[tuple[str, str], object]:
    """(repo_id, vN) -> the local version that is it (pushed from here or pulled)."""
    from .remote import VERSION_TAG

    out = {}
    for rec in reg.list(limit=None):
        for h in rec.hub or []:
            if VERSION_TAG.match(h.get("revision") or ""):
                out.setdefault((h["repo_id"], h["revision"]), rec)
        o = rec.origin or {}
        if o.get("version"):
            out.setdefault((o["repo_id"], o["version"]), rec)
    return out


def sync(org: str, *, weights: bool = False, token: str | None = None, registry_home=None) -> dict:
    """Bring the namespace's versions and aliases this registry lacks (metadata always, cached
    by commit; the weights too with ``weights``), tag a head a crashed push left untagged
    (when the token may), and name the local versions that are not on the Hub."""
    from ..paths import registry_home as home
    from ..registry import open_registry
    from .pull import pull
    from .team import Attempts, repair_head

    listing = read_namespace(org, token=token, registry_home=registry_home)
    tok = resolve_token(token)
    repaired = []
    if tok:
        api, ep = client(tok), endpoint()
        for repo_id, (refs, fields) in listing.repos.items():
            stats = Attempts()
            try:
                repair_head(api, repo_id, ep, refs, fields, stats)
            except HubError as e:  # a read-only token: say so, the next push repairs it
                listing.problems.append(f"{repo_id}: head left untagged ({e})")
            repaired += [f"{repo_id}@{version_tag(k)}" for k in stats.repaired]
    if repaired:  # a repaired head is a version now: list it
        listing = read_namespace(org, token=token, registry_home=registry_home)
    reg = open_registry(home(registry_home))
    have = _local_index(reg)
    missing = [r for r in listing.rows if (r["repo"], r["tag"]) not in have]
    pulled = []
    if weights:
        for r in missing:
            res = pull(f"{r['repo']}@{r['tag']}", token=token, registry_home=registry_home)
            pulled.append({"repo": r["repo"], "tag": r["tag"], "ref": res.record.ref, "is_new": res.is_new})
        have = _local_index(reg)
    aliases = []
    for r in listing.rows:
        rec = have.get((r["repo"], r["tag"]))
        if rec is None:
            continue
        for alias in r["aliases"]:
            current = reg.get(rec.id)
            others = [x for x in reg.list(name=current.name, alias=alias, limit=None)]
            if not others:  # the registry lacks this alias: take the team's
                reg.set_alias(current, alias)
                aliases.append(f"{current.name}:{alias} -> {current.ref}")
    on_hub = {rec.id for rec in have.values()}
    not_on_hub = [rec.ref for rec in reg.list(limit=None) if rec.id not in on_hub
                  and not any(h["repo_id"].split("/")[0] == org for h in rec.hub or [])]
    return {"org": org, "versions": len(listing.rows), "missing": [f"{r['repo']}@{r['tag']}" for r in missing],
            "pulled": pulled, "aliases_set": aliases, "repaired": repaired, "not_on_hub": not_on_hub,
            "problems": listing.problems, "downloads": listing.downloads}
