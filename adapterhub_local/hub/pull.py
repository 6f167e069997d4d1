"""`adapters pull`: a LoRA adapter repo from the Hub into the registry as a new version.

    model_info (is it a LoRA repo? which commit?) -> snapshot_download into a temp dir
      -> verify hashes (Hub LFS oids, adapterhub.json) -> validate the adapter
      -> [check shapes and fingerprint against --base] -> registry.register -> set_hub

Every check runs before the registry is touched, so a failed pull leaves nothing
behind. A version `adapters sync` recorded as metadata only (same repo, same commit) gets
its weights in that same record, once the files downloaded have the content hash it
recorded (``check_fill``). The registry stores content-addressed versions: pulling the same revision
again registers the same bytes and makes no new version.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AdapterHubError, AdapterNotFound, BaseMismatch, InvalidAdapter
from ..provenance import MAX_BYTES as MAX_PROV_BYTES
from ..provenance import NAME as PROVENANCE_NAME
from ..provenance import read as read_provenance
from .common import (
    check_commit_id,
    check_file_name,
    check_online,
    client,
    endpoint,
    resolve_token,
    split_repo_spec,
    validate_repo_id,
)
from .errors import HubError, NotALoraRepo, hub_errors

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# what a server may announce for the files we download (ADAPTERS_MAX_ADAPTER_BYTES raises the first)
MAX_SIZES = {"adapter_model.safetensors": 64 << 30, "adapter_config.json": 1 << 20, PROVENANCE_NAME: MAX_PROV_BYTES}
MAX_SIBLINGS = 100_000


@dataclass
class PullResult:
    repo_id: str
    revision: str
    commit_id: str
    endpoint: str
    record: object
    is_new: bool
    provenance: dict | None = None
    version: int | None = None  # vN when the revision was a version tag or an alias of one
    alias: str | None = None
    filled: bool = False  # the weights of a metadata-only version (`adapters sync`): same record
    claims: dict[str, float] = field(default_factory=dict)
    parents_linked: list[str] = field(default_factory=list)
    parents_missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        rec = self.record
        return {
            "repo_id": self.repo_id, "revision": self.revision, "commit_id": self.commit_id,
            "endpoint": self.endpoint, "ref": getattr(rec, "ref", None), "name": getattr(rec, "name", None),
            "version": getattr(rec, "version", None), "is_new": self.is_new,
            "base_fingerprint": getattr(rec, "base_fingerprint", None),
            "parents_linked": self.parents_linked, "parents_missing": self.parents_missing,
            "has_provenance": self.provenance is not None, "warnings": self.warnings,
            "hub_version": f"v{self.version}" if self.version else None, "alias": self.alias,
            "claimed_metrics": self.claims, "filled": self.filled,
        }


def _not_lora_reason(names: set[str]) -> str | None:
    if "adapter_config.json" not in names:
        if "config.json" in names and any(n.endswith((".safetensors", ".bin")) for n in names):
            return "it holds a full model (config.json and weights), not an adapter"
        return "no adapter_config.json in the repo"
    if "adapter_model.safetensors" not in names:
        if "adapter_model.bin" in names:
            return "only a pickled adapter_model.bin (not loaded: unpickling can run code)"
        return "no adapter_model.safetensors in the repo"
    return None


def _git_blob_sha1(data: bytes) -> str:
    h = hashlib.sha1(f"blob {len(data)}\0".encode())
    h.update(data)
    return h.hexdigest()


def _check_siblings(info, repo_id: str) -> dict:
    """The listing of a commit, checked before anything is downloaded: every name a safe
    relative path, the sizes of what we will fetch bounded integers."""
    import os

    sibs = list(info.siblings or [])
    if len(sibs) > MAX_SIBLINGS:
        raise HubError(f"{repo_id}: the Hub lists {len(sibs)} files; refusing a listing that long")
    out = {}
    limits = dict(MAX_SIZES)
    if os.environ.get("ADAPTERS_MAX_ADAPTER_BYTES", "").isdigit():
        limits["adapter_model.safetensors"] = int(os.environ["ADAPTERS_MAX_ADAPTER_BYTES"])
    for s in sibs:
        check_file_name(s.rfilename, repo_id)
        if s.rfilename in limits:
            size, limit = s.size, limits[s.rfilename]
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
                raise HubError(f"{repo_id}: the Hub lists {s.rfilename} with an invalid size {str(size)[:24]!r}",
                               "refusing the repo; this server is broken or hostile")
            if size is not None and size > limit:
                hint = ("set ADAPTERS_MAX_ADAPTER_BYTES for a larger adapter" if s.rfilename == ADAPTER_FILES[1]
                        else "refusing to download it")
                raise HubError(f"{repo_id}: the Hub lists {s.rfilename}: larger than {_size(limit)} "
                               f"({size:,} bytes)", hint)
        out[s.rfilename] = s
    return out


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n:,} bytes"


def _verify_download(folder: Path, siblings: dict, repo_id: str, commit: str) -> dict[str, str]:
    """sha256 of each downloaded file, checked against what the Hub says it holds (size, hash)."""
    from ..fingerprint import file_sha256

    hashes = {}
    for name in (*ADAPTER_FILES, PROVENANCE_NAME):
        path = folder / name
        if not path.is_file() or path.is_symlink():
            continue
        sib = siblings.get(name)
        if sib is not None and sib.size is not None and path.stat().st_size != sib.size:
            raise HubError(f"{repo_id}@{commit[:12]}: {name} arrived with {path.stat().st_size:,} bytes but the "
                           f"Hub lists {sib.size:,}", "the download was corrupted or the server lies; not registered")
        digest = file_sha256(path)
        hashes[name] = digest
        if sib is None:
            continue
        if sib.lfs is not None and sib.lfs.sha256 != digest:
            raise HubError(f"{repo_id}@{commit[:12]}: downloaded {name} has sha256 {digest[:16]}… but the Hub "
                           f"lists {str(sib.lfs.sha256)[:16]!r}", "the download was corrupted; run the pull again")
        if sib.lfs is None and sib.blob_id and _git_blob_sha1(path.read_bytes()) != sib.blob_id:
            raise HubError(f"{repo_id}@{commit[:12]}: downloaded {name} does not match the Hub's blob id",
                           "the download was corrupted; run the pull again")
    return hashes


def same_adapter(reg, name: str, hashes: dict[str, str]):
    """The version of ``name`` whose adapter config and weights are exactly these bytes (a push
    of it coming back, whose other files, like the README, differ), as not new; else None."""
    for rec in reg.list(name=name, limit=None):
        if all(rec.files.get(f) == hashes.get(f) for f in ADAPTER_FILES):
            rec.is_new = False
            return rec
    return None


def _claims(api, ep, repo_id, prov, version, refs, token, registry_home, warnings: list) -> dict[str, float]:
    """What the source claims about this version: adapterhub.json's metrics at its commit, and
    (for a version) those logged for it later, which live in the head's adapterhub.json."""
    from ..paths import registry_home as home
    from .remote import ProvenanceCache, team_fields

    if prov is None:
        return {}
    fields = team_fields(prov, f"{repo_id}/{PROVENANCE_NAME}")
    claims = dict(fields["metrics"])
    if version is not None and refs is not None and refs.head is not None:
        try:
            head = ProvenanceCache(home(registry_home)).get(api, ep, repo_id, refs.head, token)
        except HubError as e:
            warnings.append(f"metrics logged after the push not read: {e}")
            head = None
        if head is not None:
            claims.update(team_fields(head, f"{repo_id}/{PROVENANCE_NAME}")["later_metrics"].get(version, {}))
    return claims


def metadata_version(reg, ep: str, repo_id: str, commit: str, tag: str | None):
    """The metadata-only version (`adapters sync`) recorded from this commit of the repo, or
    None; a version tag whose metadata was recorded from another commit stops the pull."""
    for rec in reg.find_origin(ep, repo_id, commit_id=commit, version=tag):
        if rec.has_weights:
            continue
        recorded = rec.origin["commit_id"]
        if recorded != commit:
            raise HubError(f"{repo_id}@{tag} is commit {commit[:12]} on the Hub now, but {rec.ref} was recorded "
                           f"here from commit {recorded[:12]}", "the version tag was moved; nothing was changed")
        return rec
    return None


def check_fill(meta, hashes: dict[str, str], base_fp: str | None, repo_id: str, commit: str) -> None:
    """The downloaded files must be the ones whose hashes the metadata-only version recorded
    (its content hash), on the base it recorded; else one line and nothing changes."""
    from ..registry.core import content_hash

    got = content_hash({f: (hashes.get(f, ""), 0) for f in ADAPTER_FILES})
    if got != meta.content_sha256:
        raise HubError(f"{repo_id}@{commit[:12]}: the files downloaded are not the ones recorded for {meta.ref} "
                       f"(content {got[:12]}…, recorded {meta.content_sha256[:12]}…)",
                       "the repo or the server changed what this commit holds; nothing was changed")
    if base_fp and meta.base_fingerprint and base_fp != meta.base_fingerprint:  # --base OTHER --force
        raise HubError(f"{repo_id}@{commit[:12]}: base {base_fp[:19]}… but {meta.ref} recorded "
                       f"{meta.base_fingerprint[:19]}…", "nothing was changed; `--name NEW` registers these "
                       "weights apart, against this base")


def _same_files_at(api, repo_id: str, ep: str, commit: str, siblings: dict, authed: bool) -> bool:
    """Does the Hub list the adapter files at ``commit`` with the blob ids (and LFS sha256) it
    lists in ``siblings``? What the Hub hashed, not what an adapterhub.json there claims."""
    with hub_errors("repo lookup", repo_id, ep, authenticated=authed, revision=commit):
        there = _check_siblings(api.model_info(repo_id, revision=commit, files_metadata=True), repo_id)

    def ident(s):
        return s.blob_id, s.lfs.sha256 if s.lfs is not None else None

    return all(f in there and f in siblings and there[f].blob_id and ident(there[f]) == ident(siblings[f])
               for f in ADAPTER_FILES)


def default_name(repo_id: str) -> str:
    return repo_id.split("/", 1)[1]


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """``ORG/NAME[@REVISION]`` or ``ORG/NAME:ALIAS`` -> (repo_id, revision, alias)."""
    if ":" in spec and "@" not in spec:
        from .team import check_alias

        repo_id, _, alias = spec.partition(":")
        return validate_repo_id(repo_id), None, check_alias(alias)
    repo_id, revision = split_repo_spec(spec)
    return repo_id, revision, None


def resolve_version(api, repo_id: str, ep: str, revision: str | None, alias: str | None, authed: bool):
    """(commit, N, refs) for ``@vN`` or ``:ALIAS`` (an alias resolves to its version now);
    (None, None, None) for any other revision."""
    from .remote import VERSION_TAG, read_refs

    if alias is None and not (revision and VERSION_TAG.match(revision)):
        return None, None, None
    refs = read_refs(api, repo_id, ep, authenticated=authed)
    if alias is not None:
        commit = refs.aliases.get(alias)
        if commit is None:
            raise HubError(f"{repo_id} has no alias {alias!r}",
                           f"aliases: {', '.join(sorted(refs.aliases)) or 'none'}")
        n = refs.version_of(commit)
        if n is None:
            raise HubError(f"{repo_id}:{alias} points at commit {commit[:12]}, which has no version tag",
                           "move the alias to a version with `adapters remote alias`")
        return commit, n, refs
    n = int(revision[1:])
    if n not in refs.versions:
        from .errors import RevisionNotFound

        raise RevisionNotFound(repo_id, revision)
    return refs.versions[n], n, refs


def pull(spec: str, *, name: str | None = None, base: str | Path | None = None, token: str | None = None,
         force: bool = False, registry_home=None) -> PullResult:
    """Download REPO_ID[@REVISION] (or REPO_ID:ALIAS) and register it; see the module docstring."""
    from huggingface_hub import snapshot_download

    from ..paths import registry_home as home
    from ..peft_format import check_adapter
    from ..registry.core import check_name
    from ..registry.metadata import MAX_PARENTS

    repo_id, revision, alias = parse_spec(spec)
    asked_name = name
    name = check_name(name or default_name(repo_id))  # before any download
    base_dir = Path(base).expanduser() if base is not None else None
    if base_dir is not None and not base_dir.is_dir():
        raise AdapterHubError(f"{base_dir}: --base must be a model folder")
    check_online()
    ep = endpoint()
    tok = resolve_token(token)
    api = client(tok)
    authed = tok is not None
    target, version, refs = resolve_version(api, repo_id, ep, revision, alias, authed)
    if version is not None:
        revision = f"v{version}"  # the record names the version, never the alias
    with hub_errors("repo lookup", repo_id, ep, authenticated=authed, revision=revision):
        info = api.model_info(repo_id, revision=target or revision, files_metadata=True)
    commit = check_commit_id(info.sha, repo_id)
    if target is not None and commit != target:
        raise HubError(f"{repo_id}: asked for commit {target[:12]}, the Hub answered for {commit[:12]}",
                       "this server is broken or hostile; nothing was registered")
    siblings = _check_siblings(info, repo_id)
    reason = _not_lora_reason(set(siblings))
    if reason:
        raise NotALoraRepo(repo_id, revision or "main", reason)

    work = Path(tempfile.mkdtemp(prefix="adapters-pull-"))
    try:
        dl = work / "download"
        with hub_errors("download", repo_id, ep, authenticated=authed):
            snapshot_download(repo_id, revision=commit, local_dir=dl, endpoint=ep, token=tok,
                              allow_patterns=[*ADAPTER_FILES, PROVENANCE_NAME], max_workers=2)
        hashes = _verify_download(dl, siblings, repo_id, commit)

        result_warnings: list[str] = []
        prov = None
        if (dl / PROVENANCE_NAME).is_file():  # a file we cannot accept stops the pull, in one line
            prov = read_provenance(dl / PROVENANCE_NAME, where=f"{repo_id}@{commit[:12]}/{PROVENANCE_NAME}")
        claimed = ((prov or {}).get("team") or {}).get("version")
        if version is None and claimed is not None and (revision is None or revision == "main"):
            # a team repo's head pulled by branch: when it is a tagged version, record it as one;
            # a head that only adds metrics or the alias table over vK's files is vK (at vK's commit), when the
            # Hub lists the same adapter files at vK's commit (adapterhub.json there may lie about them)
            from ..paths import registry_home as home
            from .remote import ProvenanceCache, read_refs
            from .team import _holds

            refs = read_refs(api, repo_id, ep, authenticated=authed)
            tagged = refs.versions.get(claimed)
            if tagged is not None and _holds(api, repo_id, ep, ProvenanceCache(home(registry_home)), tok, tagged,
                                             commit, prov.get("files") or {}) \
                    and _same_files_at(api, repo_id, ep, tagged, siblings, authed):
                version, revision, commit = claimed, f"v{claimed}", tagged
        if prov is not None:
            for fname, digest in (prov.get("files") or {}).items():
                if fname in hashes and hashes[fname] != digest:
                    raise HubError(f"{repo_id}@{commit[:12]}: {fname} has sha256 {hashes[fname][:16]}… but "
                                   f"{PROVENANCE_NAME} records {digest[:16]}…",
                                   "the repo's files were changed after it was published with adapterhub-local")

        folder = work / "adapter"
        folder.mkdir()
        for fname in ADAPTER_FILES:
            shutil.copyfile(dl / fname, folder / fname)
        try:
            adapter = check_adapter(folder)  # every check load_adapter makes, without reading arrays
        except InvalidAdapter as e:
            raise NotALoraRepo(repo_id, revision or "main", e.problem) from None

        prov_fp = ((prov or {}).get("base") or {}).get("fingerprint")
        base_fp = prov_fp
        if base_dir is not None:
            from ..fingerprint import fingerprint_model
            from ..registry.register import base_shapes, check_shapes

            check_shapes(adapter, base_shapes(base_dir), str(base_dir))  # register's own check, before any write
            actual = fingerprint_model(base_dir, progress=True).fingerprint
            if prov_fp and prov_fp != actual and not force:
                err = BaseMismatch(prov_fp, actual)
                err.hint = "give the base the adapter was published for, or --force to register it anyway"
                raise err
            if prov_fp and prov_fp != actual:
                result_warnings.append(f"--force: registered against {actual}, not the published base {prov_fp}")
            base_fp = actual

        from ..registry import open_registry

        reg = open_registry(home(registry_home))
        meta = metadata_version(reg, ep, repo_id, commit, revision if version else None)
        if meta is not None and asked_name in (None, meta.name):
            check_fill(meta, hashes, base_fp, repo_id, commit)  # register below fills it: same record
            name = meta.name
        lineage = (prov or {}).get("lineage") or {}
        linked, missing = [], []
        parents = lineage.get("parents") if isinstance(lineage.get("parents"), list) else []
        for parent in parents[:MAX_PARENTS]:  # as many as a synced version links to
            if not isinstance(parent, str) or len(parent) > 200:
                continue
            try:
                reg.resolve(parent)
                linked.append(parent)
            except AdapterNotFound:
                missing.append(parent)
        claims = _claims(api, ep, repo_id, prov, version, refs, tok, registry_home, result_warnings)
        published = (prov or {}).get("registry") or {}
        provenance = {
            "source": "hub", "endpoint": ep, "repo_id": repo_id, "revision": revision or "main",
            "commit_id": commit, "files": {k: v for k, v in hashes.items() if k in ADAPTER_FILES},
            "published_as": published.get("ref"), "lineage": lineage, "adapterhub": prov,
            "version": revision if version else None,
        }
        kwargs = {"base_dir": base_dir} if base_dir is not None else {"base_fingerprint": base_fp}
        rec = same_adapter(reg, name, hashes)
        pulled_here = rec is None
        if rec is None:
            # metrics from a Hub are its claims, kept apart from what was measured here
            rec = reg.register(folder, name, note=f"pulled from {ep}/{repo_id}@{commit[:12]}",
                               parents=tuple(linked), provenance=provenance, **kwargs)
        origin = getattr(rec, "origin", None) or {}
        if pulled_here or (origin.get("repo_id") == repo_id and origin.get("endpoint") == ep):
            src = f"{repo_id}@{revision or 'main'}"
            if pulled_here:
                reg.set_origin(rec, endpoint=ep, repo_id=repo_id, version=revision if version else None,
                               commit_id=commit)
            if claims:
                reg.add_claims(rec, claims, source=src)
        from .push import record_hub

        record_hub(registry_home, rec.ref, repo_id, revision or "main", commit)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return PullResult(repo_id=repo_id, revision=revision or "main", commit_id=commit, endpoint=ep, record=rec,
                      is_new=bool(getattr(rec, "is_new", True)), provenance=prov, version=version, alias=alias,
                      filled=bool(getattr(rec, "filled", False)), claims=claims, parents_linked=linked,
                      parents_missing=missing, warnings=result_warnings)
