"""A Hub namespace as a team's registry: race-free versions, aliases, metrics.

Versions are tags ``vN`` on commits of ``main``; aliases are other tags; metrics
travel in ``adapterhub.json``. The protocol rests on two things the Hub refuses
(both verified against huggingface_hub 2.4's source, hf_api.py):

- ``create_commit(parent_commit=HEAD)`` is refused with HTTP 412 when main moved
  since HEAD was read (hf_api.py 5096-5101, the ``parent_commit`` docs; the Hub
  answers "A commit has happened since. Please refresh and try again.");
- ``create_tag`` on an existing tag is HTTP 409 (hf_api.py 7161-7167: only
  ``exist_ok=True`` swallows it, which we never pass: it would hide a collision);
- ``create_commit`` whose files are all unchanged returns the head without
  committing and without the parent check (hf_api.py 5255-5275), so "already
  there" is decided here, from the head's adapterhub.json, never from that return.

A push (``commit_version``) reads the refs and the head's adapterhub.json, takes
N = 1 + max(highest vN tag, the version the head's adapterhub.json claims), writes
N into adapterhub.json and commits on the head it read. Commits are serialised by
the parent check, and each version commit names its number, so two pushers can
never both commit "v7": the second one's commit is refused (412), re-reads, and
becomes v8. The tag follows the commit; a crash in between leaves an untagged
version commit at the head, which the next push or ``sync`` tags (a 409 there
means someone else did it first: fine when the tag points at that commit).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import provenance
from ..provenance import NAME as PROVENANCE_NAME
from .common import REF_NAME_RE, check_commit_id, client, endpoint, resolve_token, validate_repo_id
from .errors import HubError, NoToken, hub_errors
from .remote import (
    VERSION_LIKE,
    VERSION_TAG,
    ProvenanceCache,
    RepoRefs,
    read_refs,
    team_fields,
    version_tag,
)

MAX_ATTEMPTS = 40


@dataclass
class Attempts:
    """What a race cost: commits refused on a stale parent (412), tags already taken (409)."""

    attempts: int = 0
    stale_parent: int = 0
    tag_taken: int = 0
    repaired: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)  # claims repair_head would not tag


@dataclass
class VersionResult:
    repo_id: str
    version: int
    commit_id: str
    unchanged: bool
    attempts: Attempts

    @property
    def tag(self) -> str:
        return version_tag(self.version)


def _status(err) -> int | None:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError) and getattr(err, "response", None) is not None:
        return err.response.status_code
    return None


def _backoff(attempt: int) -> None:
    time.sleep(random.uniform(0.01, 0.05) * min(attempt, 10))


def create_tag(api, repo_id: str, ep: str, tag: str, commit: str) -> bool:
    """Tag ``commit``; True when the tag now points there (made by us or by someone else),
    False when the name is taken by another commit."""
    from huggingface_hub.errors import HfHubHTTPError

    with hub_errors(f"creating tag {tag}", repo_id, ep):
        try:
            api.create_tag(repo_id, tag=tag, revision=commit)
            return True
        except HfHubHTTPError as e:
            if _status(e) != 409:
                raise
    refs = read_refs(api, repo_id, ep)
    m = VERSION_TAG.match(tag)
    return (refs.versions.get(int(m.group(1))) if m else refs.aliases.get(tag)) == commit


def head_state(api, repo_id: str, ep: str, cache: ProvenanceCache, token: str | None):
    """(refs, raw head adapterhub.json or None, its checked team fields or None)."""
    refs = read_refs(api, repo_id, ep)
    if refs.head is None:
        raise HubError(f"{repo_id} has no main branch")
    prov = cache.get(api, ep, repo_id, refs.head, token)
    fields = team_fields(prov, f"{repo_id}@{refs.head[:12]}/{PROVENANCE_NAME}") if prov else None
    return refs, prov, fields


def repair_head(api, repo_id: str, ep: str, refs: RepoRefs, fields: dict | None, stats: Attempts) -> None:
    """The head claims version K but no tag vK exists: a push that died (or is about to
    tag) between its commit and its tag. Tag it; if someone else did, fine.

    Only what a dying push can leave is repaired: a head that carries no version tag yet and
    claims exactly the next number (a push takes 1 + the largest tag). Any other claim (a
    tagged head claiming another number, a gap, a jump to v99) is a hand-edited or hostile
    adapterhub.json: nothing is tagged, and the claim is counted in ``stats.refused``."""
    k = (fields or {}).get("version")
    if k is None or k in refs.versions:
        return
    if refs.head in refs.versions.values() or k != max(refs.versions, default=0) + 1:
        stats.refused.append(k)
        return
    if create_tag(api, repo_id, ep, version_tag(k), refs.head):
        refs.versions[k] = refs.head
        stats.repaired.append(k)
    else:
        stats.tag_taken += 1


def _holds(api, repo_id: str, ep: str, cache: ProvenanceCache, token, tagged: str, head: str, files: dict) -> bool:
    """Does the commit tagged vK hold exactly ``files``? (The head claims vK with these files, but
    the tag may be on another commit: a metrics-only commit after vK, or a vK tagged by hand.)"""
    if tagged == head:
        return True
    prov = cache.get(api, ep, repo_id, tagged, token)
    return prov is not None and team_fields(prov, f"{repo_id}@{tagged[:12]}/{PROVENANCE_NAME}")["files"] == files


def commit_version(api, staged: Path, repo_id: str, ep: str, token: str | None, *, message: str,
                   cache: ProvenanceCache) -> VersionResult:
    """Commit the staged folder as the next version of ``repo_id`` and tag it (see module doc)."""
    from huggingface_hub import CommitOperationAdd

    base = provenance.read(staged / PROVENANCE_NAME)
    ours = base.get("files") or {}
    stats = Attempts()
    for attempt in range(1, MAX_ATTEMPTS + 1):
        stats.attempts = attempt
        refs, head_prov, fields = head_state(api, repo_id, ep, cache, token)
        repair_head(api, repo_id, ep, refs, fields, stats)
        k = (fields or {}).get("version")
        if fields and fields["files"] == ours and k in refs.versions and \
                _holds(api, repo_id, ep, cache, token, refs.versions[k], refs.head, ours):
            return VersionResult(repo_id, k, refs.versions[k], True, stats)
        n = refs.latest + 1  # from the tags alone: a head's claim is not trusted (repair_head)
        head_team = (head_prov or {}).get("team") or {}
        team = {"repo_id": repo_id, "version": n, "metrics": head_team.get("metrics") or {}}
        if head_team.get("aliases"):  # the alias table travels like the metrics (refs_cache.py)
            team["aliases"] = head_team["aliases"]
        prov = {**base, "team": team}
        provenance.write(staged, prov)
        ops = [CommitOperationAdd(path_in_repo=p.relative_to(staged).as_posix(), path_or_fileobj=str(p))
               for p in sorted(staged.rglob("*")) if p.is_file()]
        from huggingface_hub.errors import HfHubHTTPError

        with hub_errors("upload", repo_id, ep, resumable=True):
            try:
                info = api.create_commit(repo_id, ops, commit_message=f"{message} as {version_tag(n)}",
                                         parent_commit=refs.head)
            except HfHubHTTPError as e:
                if _status(e) != 412:
                    raise
                stats.stale_parent += 1
                info = None
        if info is None:
            _backoff(attempt)
            continue
        commit = check_commit_id(info.oid, repo_id)
        if create_tag(api, repo_id, ep, version_tag(n), commit):
            return VersionResult(repo_id, n, commit, False, stats)
        stats.tag_taken += 1  # vN went to another commit: our commit stays untagged; go again as N+1
        _backoff(attempt)
    raise HubError(f"{repo_id}: gave up after {MAX_ATTEMPTS} attempts: others keep pushing at the same moment",
                   "run the same command again")


# -- aliases -------------------------------------------------------------------------------

def check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not REF_NAME_RE.match(alias):
        raise HubError(f"bad alias {alias!r}", "use letters, digits, '.', '_' and '-'")
    if VERSION_LIKE.match(alias) or alias in ("main", "latest"):
        raise HubError(f"{alias!r} is reserved", "names like v3 are versions; pick another alias name")
    return alias


def parse_version(text: str) -> int:
    m = VERSION_TAG.match(str(text).strip())
    if not m:
        raise HubError(f"bad version {text!r}", "give a version tag like v3")
    return int(m.group(1))


def _alias_table(refs: RepoRefs, fields: dict | None) -> dict[str, str]:
    """The head's alias table (alias -> "vN"), completed with alias tags on versions that it does
    not name (aliases made before the table existed, or by hand): what `remote alias` commits."""
    table = {a: version_tag(n) for a, n in ((fields or {}).get("aliases") or {}).items()}
    for a, commit in sorted(refs.aliases.items()):
        n = refs.version_of(commit)
        if a not in table and n is not None:
            table[a] = version_tag(n)
    return table


def _commit_alias_table(api, repo_id: str, ep: str, cache: ProvenanceCache, token: str, alias: str,
                        n: int | None, remove: bool) -> tuple[RepoRefs, str | None]:
    """Commit the head's adapterhub.json with ``alias`` set to vN (or removed) in ``team.aliases``,
    on the head we read (412: read again). Returns the refs read and the alias's version before.
    A repo without adapterhub.json at its head gets no table (its tags alone change)."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(1, MAX_ATTEMPTS + 1):
        refs, prov, fields = head_state(api, repo_id, ep, cache, token)
        repair_head(api, repo_id, ep, refs, fields, Attempts())  # a version commit left untagged: tag it first
        table = _alias_table(refs, fields)
        was = refs.aliases.get(alias)
        was_v = refs.version_of(was) if was else None
        if remove and alias not in refs.aliases and alias not in table:
            raise HubError(f"{repo_id} has no alias {alias!r}", f"aliases: {', '.join(sorted(table)) or 'none'}")
        if not remove and n not in refs.versions:
            raise HubError(f"{repo_id} has no version {version_tag(n)}",
                           f"latest is {version_tag(refs.latest)}" if refs.latest else "push a version first")
        if prov is None:
            return refs, was_v and version_tag(was_v)
        new = dict(table)
        if remove:
            new.pop(alias, None)
        else:
            new[alias] = version_tag(n)
        if new == ((prov.get("team") or {}).get("aliases") or {}):
            return refs, was_v and version_tag(was_v)  # committed already (a run that died before the tag)
        team = {**(prov.get("team") or {}), "aliases": dict(sorted(new.items()))}
        op = CommitOperationAdd(path_in_repo=PROVENANCE_NAME, path_or_fileobj=provenance.dumps({**prov, "team": team})
                                .encode())
        what = f"alias {alias} removed" if remove else f"alias {alias} -> {version_tag(n)}"
        with hub_errors("commit", repo_id, ep):
            try:
                api.create_commit(repo_id, [op], parent_commit=refs.head, commit_message=what)
                return refs, was_v and version_tag(was_v)
            except HfHubHTTPError as e:
                if _status(e) != 412:
                    raise
        _backoff(attempt)
    raise HubError(f"{repo_id}: gave up after {MAX_ATTEMPTS} attempts: others keep committing", "run it again")


def _move_tag(api, repo_id: str, ep: str, alias: str, commit: str | None) -> None:
    """Point the tag ``alias`` at ``commit`` (None: no tag): delete, then create (409: someone
    else created it meanwhile; the caller looks again)."""
    from huggingface_hub.errors import HfHubHTTPError

    with hub_errors(f"deleting tag {alias}", repo_id, ep):
        try:
            api.delete_tag(repo_id, tag=alias)
        except HfHubHTTPError as e:
            if _status(e) != 404:  # someone else deleted it first: fine
                raise
    if commit is not None:
        create_tag(api, repo_id, ep, alias, commit)


def set_alias(repo_id: str, alias: str, version: str | None, *, remove: bool = False,
              token: str | None = None, registry_home=None) -> dict:
    """Point the tag ALIAS at vN's commit, or remove it. First the alias table in the head's
    adapterhub.json is committed (on the head read, 412: again), so the head changes and every
    machine's refs cache sees the move (refs_cache.py); then the tag is moved (delete, create)
    until it agrees with the table at the head: when several people move one alias at once,
    the last table committed wins and every one of them leaves the tag pointing where it says."""
    from ..paths import registry_home as home

    validate_repo_id(repo_id)
    check_alias(alias)
    n = None if remove else parse_version(version or "")
    ep, tok = endpoint(), resolve_token(token)
    if not tok:
        raise NoToken(ep)
    api = client(tok)
    cache = ProvenanceCache(home(registry_home))
    refs, was = _commit_alias_table(api, repo_id, ep, cache, tok, alias, n, remove)
    now = None if remove else version_tag(n)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        refs, prov, fields = head_state(api, repo_id, ep, cache, tok)
        if prov is not None:  # the table at the head says where the tag goes (ours or a later one)
            m = ((fields or {}).get("aliases") or {}).get(alias)
            now = version_tag(m) if m is not None else None
        target = refs.versions.get(int(now[1:])) if now else None
        if now and target is None:
            raise HubError(f"{repo_id}: the alias table names {now} for {alias}, and there is no tag {now}")
        if refs.aliases.get(alias) == target:
            break
        _move_tag(api, repo_id, ep, alias, target)
        if attempt > 1:
            _backoff(attempt)
    else:
        raise HubError(f"{repo_id}: could not move {alias}: others keep moving it", "run it again")
    if remove:
        return {"repo_id": repo_id, "alias": alias, "removed": True, "was": was, "now": now}
    return {"repo_id": repo_id, "alias": alias, "version": version_tag(n), "commit_id": refs.versions.get(n),
            "was": was, "removed": False, "now": now}


# -- metrics after a push --------------------------------------------------------------

def push_metrics(repo_id: str, n: int, metrics: dict[str, float], *, token: str | None = None,
                 registry_home=None) -> dict:
    """Record metrics of vN in the head's adapterhub.json (team.metrics.vN): a small commit on
    the head we read (412 -> again), not a new version."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    from ..paths import registry_home as home

    ep, tok = endpoint(), resolve_token(token)
    if not tok:
        raise NoToken(ep)
    api = client(tok)
    cache = ProvenanceCache(home(registry_home))
    stats = Attempts()
    for attempt in range(1, MAX_ATTEMPTS + 1):
        stats.attempts = attempt
        refs, prov, fields = head_state(api, repo_id, ep, cache, tok)
        if n not in refs.versions:
            raise HubError(f"{repo_id} has no version {version_tag(n)}")
        if prov is None:
            raise HubError(f"{repo_id} holds no adapterhub.json", "push a version with `adapters push` first")
        repair_head(api, repo_id, ep, refs, fields, stats)
        team = dict(prov.get("team") or {})
        later = dict(team.get("metrics") or {})
        merged = {**(later.get(version_tag(n)) or {}), **metrics}
        if later.get(version_tag(n)) == merged:
            return {"repo_id": repo_id, "version": version_tag(n), "commit_id": refs.head, "unchanged": True}
        later[version_tag(n)] = merged
        new = {**prov, "team": {**team, "metrics": later}}
        op = CommitOperationAdd(path_in_repo=PROVENANCE_NAME, path_or_fileobj=provenance.dumps(new).encode())
        with hub_errors("commit", repo_id, ep):
            try:
                info = api.create_commit(repo_id, [op], parent_commit=refs.head,
                                         commit_message=f"metrics for {version_tag(n)}: "
                                         + ", ".join(f"{k}={v:g}" for k, v in sorted(metrics.items())))
            except HfHubHTTPError as e:
                if _status(e) != 412:
                    raise
                stats.stale_parent += 1
                info = None
        if info is not None:
            return {"repo_id": repo_id, "version": version_tag(n), "commit_id": check_commit_id(info.oid, repo_id),
                    "unchanged": False, "retries": stats.stale_parent}
        _backoff(attempt)
    raise HubError(f"{repo_id}: gave up after {MAX_ATTEMPTS} attempts", "run the same command again")


def push_logged_metrics(rec, metrics: dict[str, float], *, split: str | None = None,
                        token: str | None = None, registry_home=None) -> list[dict]:
    """`log-metric --push`: the values just logged on ``rec``, to every repo it is a version of
    (pushed from here as vN, or pulled from there as vN)."""
    from ..registry.annotate import metric_key

    targets = []
    for h in rec.hub or []:
        m = VERSION_TAG.match(h.get("revision") or "")
        if m and (h["repo_id"], int(m.group(1))) not in targets:
            targets.append((h["repo_id"], int(m.group(1))))
    o = getattr(rec, "origin", None) or {}
    m = VERSION_TAG.match(o.get("version") or "")
    if m and (o["repo_id"], int(m.group(1))) not in targets:
        targets.append((o["repo_id"], int(m.group(1))))
    if not targets:
        raise HubError(f"{rec.ref} is no version on a Hub: it was never pushed to a repo's main branch",
                       f"push it first: adapters push {rec.ref} ORG/NAME (the metrics were recorded locally)")
    flat = {metric_key(k, split): v for k, v in metrics.items()}
    return [push_metrics(repo, n, flat, token=token, registry_home=registry_home) for repo, n in targets]
