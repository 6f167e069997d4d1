"""Reading a team namespace on a Hub: which versions and aliases a repo has (its tags),
what ``adapterhub.json`` says at a commit, and the namespace's listing.

Everything the server supplies is checked before use: tag names and commit ids,
the listing's repo ids, the size of what arrives and the provenance file's fields
(types, finite numbers, depth). A Hub's metrics are claims of their source.

``adapterhub.json`` at a commit never changes, so it is cached by commit id under the
registry home (``hub-cache/``): a second ``remote list`` downloads nothing. A repo's refs
are cached by its head commit (refs_cache.py), which the namespace listing carries.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..fsutil import atomic_write_bytes
from ..provenance import NAME as PROVENANCE_NAME
from .common import COMMIT_RE, REF_NAME_RE, check_commit_id, check_file_name, validate_namespace, validate_repo_id
from .errors import HubError, hub_errors

VERSION_TAG = re.compile(r"^v([1-9][0-9]{0,8})\Z")  # v1 .. v999999999: the versions
VERSION_LIKE = re.compile(r"^[vV][0-9]+\Z")  # reserved: never an alias (v02, V3 are ignored, not aliases)
MAX_PROVENANCE_BYTES = 4 << 20  # provenance.MAX_BYTES: the one bound on an adapterhub.json
MAX_REPOS = 5000  # a namespace listing longer than this is refused, not walked forever
MAX_TAGS = 5000
MAX_METRICS = 1000
_FP = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-/]{0,127}\Z")


def version_tag(n: int) -> str:
    return f"v{n}"


@dataclass
class RepoRefs:
    """A repo's main head, its version tags (N -> commit) and its other tags (aliases)."""

    repo_id: str
    head: str | None
    versions: dict[int, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    ignored: int = 0  # tags we do not act on (odd names, v02): refs we did not make; never cached

    @property
    def latest(self) -> int:
        return max(self.versions, default=0)

    def version_of(self, commit: str) -> int | None:
        found = [n for n, c in self.versions.items() if c == commit]
        return min(found) if found else None

    def aliases_of(self, commit: str) -> list[str]:
        return sorted(a for a, c in self.aliases.items() if c == commit)


def read_refs(api, repo_id: str, ep: str, *, authenticated: bool = True) -> RepoRefs:
    """list_repo_refs, checked: every commit id is 40 hex, tag names are ones we could have
    created (others are ignored: we never act on them), at most MAX_TAGS tags."""
    with hub_errors("reading tags", repo_id, ep, authenticated=authenticated):
        refs = api.list_repo_refs(repo_id)
    tags = list(refs.tags or [])
    if len(tags) > MAX_TAGS:
        raise HubError(f"{repo_id}: the Hub lists {len(tags)} tags (more than {MAX_TAGS})",
                       "refusing to walk it; is this a team registry repo?")
    head = None
    for b in refs.branches or []:
        if b.name == "main":
            head = check_commit_id(b.target_commit, repo_id, "head commit")
    out = RepoRefs(repo_id=repo_id, head=head)
    for t in tags:
        if not isinstance(t.name, str) or not REF_NAME_RE.match(t.name):
            out.ignored += 1
            continue
        commit = check_commit_id(t.target_commit, repo_id, f"commit for tag {t.name!r}")
        m = VERSION_TAG.match(t.name)
        if m:
            out.versions[int(m.group(1))] = commit
        elif not VERSION_LIKE.match(t.name):
            out.aliases[t.name] = commit
        else:
            out.ignored += 1
    return out


# -- adapterhub.json at a commit --------------------------------------------------------

def _metrics(value, where: str) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_METRICS:
        raise HubError(f"{where}: metrics must be an object of at most {MAX_METRICS} numbers")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not _KEY.match(k):
            raise HubError(f"{where}: bad metric name {k[:40]!r}" if isinstance(k, str)
                           else f"{where}: bad metric name")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise HubError(f"{where}: metric {k} is not a finite number ({str(v)[:20]!r})")
        out[k] = float(v)
    return out


def team_fields(prov: dict, where: str) -> dict:
    """The fields a team registry acts on, from a format-2 adapterhub.json (already through
    provenance.loads), each checked again: version (team.version), base fingerprint, metrics
    (at push time, and team.metrics: those logged later, per vN), file hashes, the name."""
    team = prov.get("team") if isinstance(prov.get("team"), dict) else {}
    version = team.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or not 0 < version < 10**9):
        raise HubError(f"{where}: team.version must be a positive integer")
    base = prov.get("base") if isinstance(prov.get("base"), dict) else {}
    fp = base.get("fingerprint")
    if fp is not None and (not isinstance(fp, str) or not _FP.match(fp)):
        raise HubError(f"{where}: base.fingerprint is not sha256:<64 hex>")
    files = prov.get("files") if isinstance(prov.get("files"), dict) else {}
    for name, digest in files.items():
        check_file_name(name, where)
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise HubError(f"{where}: files[{name!r}] is not a sha256")
    later = team.get("metrics") if isinstance(team.get("metrics"), dict) else {}
    later_out = {}
    aliases = team.get("aliases") if isinstance(team.get("aliases"), dict) else {}
    if len(aliases) > MAX_TAGS:
        raise HubError(f"{where}: team.aliases holds more than {MAX_TAGS} aliases")
    aliases_out = {}
    for alias, tag in aliases.items():
        m = VERSION_TAG.match(tag) if isinstance(tag, str) else None
        if not isinstance(alias, str) or not REF_NAME_RE.match(alias) or VERSION_LIKE.match(alias) or not m:
            raise HubError(f"{where}: team.aliases must map alias names to version tags like v3")
        aliases_out[alias] = int(m.group(1))
    for key, values in later.items():
        m = VERSION_TAG.match(key) if isinstance(key, str) else None
        if not m:
            raise HubError(f"{where}: team.metrics keys must be version tags like v3")
        later_out[int(m.group(1))] = _metrics(values, where)
    reg = prov.get("registry") if isinstance(prov.get("registry"), dict) else {}
    name = reg.get("name") if isinstance(reg.get("name"), str) and REF_NAME_RE.match(reg["name"]) else None
    rank = prov.get("adapter", {}).get("r") if isinstance(prov.get("adapter"), dict) else None
    return {
        "version": version, "base_fingerprint": fp, "files": dict(files),
        "metrics": _metrics(prov.get("metrics"), where), "later_metrics": later_out,
        "aliases": aliases_out,
        "name": name, "rank": rank if isinstance(rank, int) and not isinstance(rank, bool) else None,
        "lineage": prov.get("lineage") if isinstance(prov.get("lineage"), dict) else {},
    }


def parse_strict(data: bytes, where: str) -> dict:
    """adapterhub.json from a Hub: the provenance module's strict read (bounded size, depth and
    count, types, finite numbers), then the team fields checked too."""
    from .. import provenance

    if len(data) > MAX_PROVENANCE_BYTES:
        raise HubError(f"{where}: {len(data)} bytes, more than an adapterhub.json may hold")
    try:
        prov = provenance.loads(data, where)
    except provenance.ProvenanceError as e:
        raise HubError(str(e).split("\n")[0]) from None
    team_fields(prov, where)
    return prov


class ProvenanceCache:
    """adapterhub.json per (endpoint, repo, commit): immutable, so cached forever."""

    def __init__(self, home: Path | None):
        self.root = Path(home) / "hub-cache" if home is not None else None
        self.downloads = 0

    def _path(self, ep: str, repo_id: str, commit: str) -> Path | None:
        if self.root is None:
            return None
        key = hashlib.sha256(f"{ep}\0{repo_id}\0{commit}".encode()).hexdigest()
        return self.root / key[:2] / f"{key}.json"

    def get(self, api, ep: str, repo_id: str, commit: str, token: str | None) -> dict | None:
        """The checked adapterhub.json at ``commit``, or None when the commit has none."""
        check_commit_id(commit, repo_id)
        path = self._path(ep, repo_id, commit)
        where = f"{repo_id}@{commit[:12]}/{PROVENANCE_NAME}"
        if path is not None and path.is_file():
            try:  # our own file, but a disk can be corrupt or the file edited: never trusted
                data = path.read_bytes()
                return parse_strict(data, where) if data else None
            except (OSError, HubError):
                pass  # download it again below, and replace the bad copy
        data = fetch_file(ep, repo_id, commit, PROVENANCE_NAME, token, MAX_PROVENANCE_BYTES)
        self.downloads += 1
        prov = parse_strict(data, where) if data is not None else None
        if path is not None:
            try:
                atomic_write_bytes(path, data or b"", fsync=False)
            except OSError:
                pass  # a cache we cannot write (full disk, not a folder) costs a download next time
        return prov


def fetch_file(ep: str, repo_id: str, commit: str, filename: str, token: str | None,
               max_bytes: int) -> bytes | None:
    """One GET of a small file at a commit; None when the commit has no such file. The body
    may not exceed ``max_bytes`` and must be exactly as long as the server declared."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    from .common import install_timeout

    install_timeout()
    url = hf_hub_url(repo_id, filename, revision=commit, endpoint=ep)
    headers = build_hf_headers(token=token, library_name="adapterhub-local")
    where = f"{repo_id}@{commit[:12]}/{filename}"
    with hub_errors(f"downloading {filename}", repo_id, ep, authenticated=token is not None, revision=commit):
        with get_session().stream("GET", url, headers=headers) as r:
            if r.status_code == 404 and r.headers.get("X-Error-Code") == "EntryNotFound":
                return None
            if r.status_code >= 400:
                r.read()
                hf_raise_for_status(r)
            declared = r.headers.get("Content-Length")
            if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
                raise HubError(f"{where}: the server announces {declared[:20]!r} bytes (at most {max_bytes})")
            buf = bytearray()
            for chunk in r.iter_bytes():
                buf += chunk
                if len(buf) > max_bytes:
                    raise HubError(f"{where}: more than {max_bytes} bytes arrived")
            if declared is not None and int(declared) != len(buf):
                raise HubError(f"{where}: {len(buf)} bytes arrived, the server announced {declared}")
    return bytes(buf)


@dataclass
class Namespace:
    """The namespace listing: repo id -> its main head as the listing says (None when the
    server did not say), and how many pages (requests) it took."""

    heads: dict[str, str | None] = field(default_factory=dict)
    pages: int = 0


def list_namespace(org: str, ep: str, token: str | None, tag: str) -> Namespace:
    """Repos of ``org`` carrying our card tag (plain PEFT repos are left out), with each one's
    head commit: ``GET /api/models?author=ORG&filter=TAG&expand=sha``, paged by the Link
    header, as huggingface_hub 2.4's ``list_models`` sends it (hf_api.py 2378: ``expand``
    returns only the properties named; 2382: ``sha`` and ``lastModified`` come with ``full``,
    which would also bring every file of every repo; 2489-2492: ``expand`` is a list param,
    the pages are followed by utils/_pagination.py 27-53). Our own paging, to count the pages
    and to never follow a next page (with the token) off the endpoint's listing."""
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

    from .common import install_timeout

    validate_namespace(org)
    install_timeout()
    headers = build_hf_headers(token=token or False, library_name="adapterhub-local")
    out = Namespace()
    url: str | None = f"{ep}/api/models"
    params: dict | None = {"author": org, "filter": tag, "expand": ["sha"]}
    seen = 0
    with hub_errors("listing the namespace", org, ep, authenticated=token is not None):
        while url is not None:
            r = http_backoff("GET", url, params=params, headers=headers)
            out.pages += 1
            hf_raise_for_status(r)
            try:
                page = r.json()
            except ValueError:
                raise HubError(f"{org}: the Hub's listing is not JSON") from None
            if not isinstance(page, list):
                raise HubError(f"{org}: the Hub's listing is not a list of repos")
            for item in page:
                seen += 1
                if seen > MAX_REPOS:
                    raise HubError(f"{org}: the Hub lists more than {MAX_REPOS} repos tagged {tag}",
                                   "refusing to walk a listing that long")
                rid = item.get("id") if isinstance(item, dict) else None
                try:
                    validate_repo_id(rid)
                except HubError:
                    continue
                sha = item.get("sha")
                if rid.split("/")[0] == org and rid not in out.heads:
                    out.heads[rid] = sha if isinstance(sha, str) and COMMIT_RE.match(sha) else None
            url = r.links.get("next", {}).get("url")
            params = None  # the next link carries the query
            if url is not None and not page:  # no progress: a server could send these forever
                raise HubError(f"{org}: the Hub's listing sends a page with no repo and a next page",
                               "refusing to walk a listing that does not end")
            if url is not None and not url.startswith(f"{ep}/api/models?"):
                raise HubError(f"{org}: the Hub's listing sends the next page elsewhere ({url[:80]!r})",
                               "refusing to follow it (and to send the token there)")
    out.heads = dict(sorted(out.heads.items()))
    return out

