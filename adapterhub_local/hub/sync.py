"""`adapters sync ORG`: bring a team namespace's versions and aliases into this registry."""

from __future__ import annotations

from .common import client, endpoint, resolve_token
from .errors import HubError
from .listing import read_namespace
from .remote import version_tag


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
