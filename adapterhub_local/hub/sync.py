"""`adapters sync ORG`: bring a team namespace's versions and aliases into this registry.

    read the namespace (hub/listing.py: every version's adapterhub.json, cached by commit)
      -> tag a head a crashed push left untagged (when the token may write)
      -> each version this registry lacks: a metadata-only record (registry/metadata.py)
         from its adapterhub.json, or with ``weights`` a pull (which fills a
         metadata-only record in: same record, same ref)
      -> the team's aliases (see ``sync_aliases`` for which local aliases it may move)
      -> name the local versions that are not on the Hub

Every version is checked on its own: one whose adapterhub.json cannot be accepted (or
whose pull fails) is named in ``problems`` and the others still come in. Calls: those of
`remote list` (the adapterhub.json files come from its cache), plus a pull's for each
version whose weights are fetched. Running it twice changes nothing the second time.
"""

from __future__ import annotations

import re

from ..errors import AdapterHubError
from ..provenance import NAME as PROVENANCE_NAME
from .common import client, endpoint, resolve_token
from .errors import HubError
from .listing import read_namespace
from .remote import VERSION_TAG, ProvenanceCache, team_fields, version_tag

# what a metadata-only record keeps of a Hub's strings (shown by `list` and `show`)
_SAFE_TARGET = re.compile(r"^[A-Za-z0-9_.\-]{1,200}\Z")  # \Z: "$" lets a trailing newline in
_SAFE_BASE = re.compile(r"^[A-Za-z0-9_./:@+\-]{1,300}\Z")
MAX_TARGETS = 1000


def local_index(reg) -> dict[tuple[str, str], object]:
    """(repo_id, vN) -> the local version that is it (pushed from here, pulled, or synced)."""
    out = {}
    for rec in reg.list(limit=None):
        for h in rec.hub or []:
            if VERSION_TAG.match(h.get("revision") or ""):
                out.setdefault((h["repo_id"], h["revision"]), rec)
        o = rec.origin or {}
        if o.get("version"):
            out.setdefault((o["repo_id"], o["version"]), rec)
    return out


def _int(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62 else None


def check_version(prov: dict, row: dict, where: str) -> dict:
    """The team fields of a version's adapterhub.json, refused when it describes something else:
    a merged model, or another version than the tag it sits under."""
    if prov.get("kind") != "adapter":
        raise HubError(f"{where}: a merged model, not an adapter; not recorded")
    fields = team_fields(prov, f"{where}/{PROVENANCE_NAME}")
    if fields["version"] not in (None, row["version"]):
        raise HubError(f"{where}: its {PROVENANCE_NAME} claims version v{fields['version']}; not recorded",
                       "the repo's tags and files disagree")
    return fields


def metadata_fields(prov: dict | None, row: dict, where: str) -> dict:
    """What a metadata-only record takes from a version's adapterhub.json, checked; a HubError
    (the version is not recorded) when it cannot describe the adapter a pull would register."""
    from .pull import ADAPTER_FILES

    if prov is None:
        raise HubError(f"{where}: no {PROVENANCE_NAME} at its commit, nothing to record",
                       f"`adapters pull {row['repo']}@{row['tag']}` takes the weights as they are")
    fields = check_version(prov, row, where)
    files = {f: fields["files"].get(f) for f in ADAPTER_FILES}
    lacking = [f for f, sha in files.items() if not sha]
    if lacking:
        raise HubError(f"{where}: {PROVENANCE_NAME} lists no sha256 for {', '.join(lacking)}; not recorded",
                       "without them the weights could not be checked when they are pulled")
    adapter = prov.get("adapter") if isinstance(prov.get("adapter"), dict) else {}
    targets = [t for t in adapter.get("targets") or [] if isinstance(t, str) and _SAFE_TARGET.match(t)]
    alpha = adapter.get("lora_alpha")
    base = prov.get("base") if isinstance(prov.get("base"), dict) else {}
    base_name = base.get("hub_id") or base.get("name_or_path")
    lineage = prov.get("lineage") if isinstance(prov.get("lineage"), dict) else {}
    parents = [p for p in lineage.get("parents") or [] if isinstance(p, str) and len(p) <= 200]
    published = prov.get("registry") if isinstance(prov.get("registry"), dict) else {}
    return {"files": files, "base_fingerprint": fields["base_fingerprint"], "rank": _int(adapter.get("r")),
            "alpha": float(alpha) if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else None,
            "targets": targets[:MAX_TARGETS], "num_parameters": _int(adapter.get("trainable_parameters")),
            "base_model": base_name if isinstance(base_name, str) and _SAFE_BASE.match(base_name) else None,
            "parents": parents, "lineage": lineage, "published_as": published.get("ref")}


def record_version(reg, cache, api, ep: str, tok, row: dict):
    """A metadata-only record for one version of the listing (its claims: the row's metrics,
    those logged later included); returns the record (is_new False when it was here)."""
    from .pull import default_name

    repo, tag, commit = row["repo"], row["tag"], row["commit_id"]
    where = f"{repo}@{tag}"
    prov = cache.get(api, ep, repo, commit, tok)
    m = metadata_fields(prov, row, where)
    provenance = {"source": "hub", "endpoint": ep, "repo_id": repo, "revision": tag, "commit_id": commit,
                  "files": m["files"], "published_as": m["published_as"], "lineage": m["lineage"],
                  "adapterhub": prov, "version": tag}
    return reg.record_metadata(
        default_name(repo), files=m["files"], base_fingerprint=m["base_fingerprint"], rank=m["rank"],
        alpha=m["alpha"], targets=m["targets"], num_parameters=m["num_parameters"], base_model=m["base_model"],
        note=f"synced from {ep}/{repo}@{commit[:12]}", provenance=provenance, parents=m["parents"],
        claims=row["metrics"], origin={"endpoint": ep, "repo_id": repo, "version": tag, "commit_id": commit})


def sync_aliases(reg, listing, have: dict) -> dict[str, list[str]]:
    """The team's aliases, into this registry. An alias is set when the local name has none of
    that name; moved (or removed) when the team moved (or removed) it, but only if sync set it
    from this repo; an alias set here (`adapters alias`) is never touched: it is reported."""
    from ..registry.common import check_name

    out: dict[str, list[str]] = {"set": [], "kept": [], "removed": [], "problems": []}
    for repo_id in listing.repos:
        team = {a: r for r in listing.rows if r["repo"] == repo_id for a in r["aliases"]}
        names = set()
        for alias, r in sorted(team.items()):
            rec = have.get((repo_id, r["tag"]))
            if rec is None:
                continue
            try:  # a tag made by another tool: "latest" and "2024" are no local alias names
                check_name(alias, "alias")
            except AdapterHubError:
                out["problems"].append(f"{repo_id}:{alias}: not a local alias name; not set here")
                continue
            names.add(rec.name)
            current = reg.alias_sources(rec.name).get(alias)
            if current is not None and current["version_id"] == rec.id:
                continue
            if current is None or current["source"] == repo_id:
                reg.set_alias(rec, alias, source=repo_id)
                was = f" (was {current['ref']})" if current else ""
                out["set"].append(f"{rec.name}:{alias} -> {rec.ref}{was}")
            else:
                out["kept"].append(f"{rec.name}:{alias} stays {current['ref']} (set here; {repo_id}:{alias} "
                                   f"is {r['tag']} = {rec.ref})")
        names |= {rec.name for (rid, _), rec in have.items() if rid == repo_id}
        for name in sorted(names):
            for alias, current in sorted(reg.alias_sources(name).items()):
                if current["source"] == repo_id and alias not in team:
                    reg.remove_alias(name, alias)
                    out["removed"].append(f"{name}:{alias} (was {current['ref']}; gone from {repo_id})")
    return out


def _repair(listing, org: str, token, registry_home):
    """Tag heads a crashed push left untagged (needs a token that may write); re-read after."""
    from .team import Attempts, repair_head

    tok = resolve_token(token)
    repaired, notes = [], []
    if tok:
        api, ep = client(tok), endpoint()
        for repo_id, (refs, fields) in listing.repos.items():
            stats = Attempts()
            try:
                repair_head(api, repo_id, ep, refs, fields, stats)
            except HubError as e:  # a read-only token: say so, the next push repairs it
                notes.append(f"{repo_id}: head left untagged ({e})")
            repaired += [f"{repo_id}@{version_tag(k)}" for k in stats.repaired]
            latest = version_tag(max(refs.versions)) if refs.versions else "no version yet"
            notes += [f"{repo_id}: head claims {version_tag(k)}, which no unfinished push leaves "
                      f"(latest {latest}); not tagged" for k in stats.refused]
    if repaired:  # a repaired head is a version now: list it (the re-read names its own problems)
        listing = read_namespace(org, token=token, registry_home=registry_home)
    listing.problems += notes
    return listing, repaired


def _fetch(reg, rows: list[dict], have: dict, *, weights: bool, token, registry_home, problems: list) -> tuple:
    """Record (metadata only) or pull (with ``weights``) each version this registry lacks."""
    from ..paths import registry_home as home
    from .pull import pull

    recorded, pulled = [], []
    tok = resolve_token(token)
    api, ep = client(tok), endpoint()
    cache = ProvenanceCache(home(registry_home))
    for r in rows:
        rec = have.get((r["repo"], r["tag"]))
        if rec is not None and (rec.has_weights or not weights):
            continue
        where = f"{r['repo']}@{r['tag']}"
        try:
            if weights:
                prov = cache.get(api, ep, r["repo"], r["commit_id"], tok)
                if prov is not None:  # the same checks as a metadata-only record (pull does the rest)
                    check_version(prov, r, where)
                res = pull(where, token=token, registry_home=registry_home)
                pulled.append({"repo": r["repo"], "tag": r["tag"], "ref": res.record.ref, "is_new": res.is_new,
                               "filled": res.filled})
            else:
                rec = record_version(reg, cache, api, ep, tok, r)
                recorded.append({"repo": r["repo"], "tag": r["tag"], "ref": rec.ref, "commit_id": r["commit_id"],
                                 "is_new": rec.is_new})
        except AdapterHubError as e:
            msg = str(e).replace("\n", " ")
            problems.append(msg if msg.startswith(r["repo"]) else f"{where}: {msg}")
    return recorded, pulled


def sync(org: str, *, weights: bool = False, token: str | None = None, registry_home=None) -> dict:
    """Bring the namespace's versions and aliases into this registry (metadata-only records;
    the weights too with ``weights``), tag a head a crashed push left untagged (when the token
    may), and name the local versions that are not on the Hub. See the module docstring."""
    from ..paths import registry_home as home
    from ..registry import open_registry

    listing = read_namespace(org, token=token, registry_home=registry_home)
    listing, repaired = _repair(listing, org, token, registry_home)
    reg = open_registry(home(registry_home))
    have = local_index(reg)
    missing = [f"{r['repo']}@{r['tag']}" for r in listing.rows if (r["repo"], r["tag"]) not in have]
    recorded, pulled = _fetch(reg, listing.rows, have, weights=weights, token=token, registry_home=registry_home,
                              problems=listing.problems)
    have = local_index(reg)
    aliases = sync_aliases(reg, listing, have)
    listing.problems += aliases["problems"]
    on_hub = {rec.id for rec in have.values()}
    mine = {r["repo"] for r in listing.rows}
    not_on_hub = [rec.ref for rec in reg.list(limit=None) if rec.id not in on_hub
                  and not any(h["repo_id"].split("/")[0] == org for h in rec.hub or [])]
    waiting = {rec.id: rec for (repo, _), rec in have.items() if repo in mine and not rec.has_weights}
    metadata_only = [r.ref for r in sorted(waiting.values(), key=lambda r: (r.name, r.version))]
    return {"org": org, "versions": len(listing.rows), "missing": missing, "recorded": recorded,
            "pulled": pulled, "metadata_only": metadata_only, "aliases_set": aliases["set"],
            "aliases_kept": aliases["kept"], "aliases_removed": aliases["removed"], "repaired": repaired,
            "not_on_hub": not_on_hub, "problems": listing.problems, "downloads": listing.downloads}
