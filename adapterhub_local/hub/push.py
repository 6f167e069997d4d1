"""`adapters push`: publish an adapter or a merged model with a card and provenance.

    stage (files + README.md card + adapterhub.json) -> whoami -> create_repo(exist_ok)
      -> [create_branch] -> upload_folder -> registry.set_hub

The staged folder is exactly what gets uploaded; ``dry_run`` stops after staging and
sends nothing. Uploads go through huggingface_hub's upload_folder: files the repo
already holds (same sha256) are skipped, LFS objects already on the server are not
sent again, so a push that failed half-way finishes when run again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import provenance
from ..errors import AdapterHubError
from .common import check_online, client, endpoint, resolve_token, validate_repo_id
from .errors import HubError, NoToken, hub_errors
from .source import (
    Source,
    hub_id_or_none,
    payload_files,
    recipe_inputs,
    resolve_source,
    source_provenance,
)


@dataclass
class StagedFile:
    path: str
    size: int
    sha256: str


@dataclass
class PushResult:
    repo_id: str
    endpoint: str
    kind: str
    files: list[StagedFile] = field(default_factory=list)
    dry_run: bool = False
    staged_dir: str | None = None
    revision: str | None = None
    commit_id: str | None = None
    commit_url: str | None = None
    pr_url: str | None = None
    url: str | None = None
    private: bool | None = None
    unchanged: bool = False
    registry_ref: str | None = None
    base_models: list[str] = field(default_factory=list)
    base_name: str | None = None  # the base as the source records it (a Hub id, or a local path)
    version: int | None = None  # vN on the Hub: pushes to main are numbered (see hub/team.py)
    attempts: dict | None = None  # what a race cost: {"attempts", "stale_parent", "tag_taken", "repaired"}

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        return d


def _link_or_copy(src: Path, dst: Path, copy: bool) -> None:
    """A dry run gets real copies; an upload's staging dir only needs to point at the bytes
    (a hard link, else a symlink: upload_folder follows them), so a 10 GB model is not copied."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copyfile(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        os.symlink(src.resolve(), dst)


def base_models_for(src: Source, explicit: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Hub ids for the card's base_model: given ones, else what the source records."""
    if explicit:
        return [validate_repo_id(b) for b in explicit]
    out = []
    b = hub_id_or_none(src.base_name)
    if b:
        out.append(b)
    if not src.is_adapter:
        # a merge of several Hub models lists them all
        for item in recipe_inputs(src.recipe):
            for key in ("hub_id", "repo_id", "ref"):
                hid = hub_id_or_none(item.get(key)) if isinstance(item.get(key), str) else None
                if hid and hid not in out and "@" not in hid:
                    out.append(hid)
                    break
    return out


def stage(src: Source, out: Path, repo_id: str, *, template=None, base_models: list[str] | None = None,
          copy: bool = True) -> list[StagedFile]:
    """Write the exact folder a push uploads into ``out`` (which must not exist yet)."""
    from ..card import push_card
    from ..fingerprint import file_sha256
    from ..fsutil import atomic_dir

    base_models = base_models if base_models is not None else base_models_for(src)
    prov = source_provenance(src, base_hub_id=base_models[0] if base_models else None)
    serving = None
    if src.is_adapter:  # the vLLM verdict for the card; serving_summary never raises
        from ..serve import serving_summary

        serving = serving_summary(src.folder)
    card = push_card(src, prov, repo_id, base_models, template=template, serving=serving)
    with atomic_dir(out) as tmp:
        for path in payload_files(src.folder, recursive=not src.is_adapter):
            _link_or_copy(path, tmp / path.relative_to(src.folder), copy)
        (tmp / "README.md").write_text(str(card), encoding="utf-8")
        (tmp / provenance.NAME).write_text(provenance.dumps(prov), encoding="utf-8")
    files = []
    for path in sorted(out.rglob("*")):
        if path.is_file():
            rel = path.relative_to(out).as_posix()
            files.append(StagedFile(rel, path.stat().st_size, src.files.get(rel) or file_sha256(path)))
    return files


def _prepare_dry_run_dir(dry_run_dir) -> Path:
    if dry_run_dir is None:
        return Path(tempfile.mkdtemp(prefix="adapters-push-")) / "repo"
    out = Path(dry_run_dir).expanduser()
    if out.exists():
        if not out.is_dir() or any(out.iterdir()):
            raise AdapterHubError(f"{out}: already exists and is not empty", "give a new or empty --dry-run-dir")
        out.rmdir()
    return out


def push(ref: str, repo_id: str, *, private: bool = False, revision: str | None = None, create_pr: bool = False,
         commit_message: str | None = None, token: str | None = None, dry_run: bool = False,
         dry_run_dir: str | os.PathLike | None = None, card_template: str | os.PathLike | None = None,
         base_model: list[str] | tuple[str, ...] = (), registry_home=None) -> PushResult:
    """Publish REF_OR_DIR to REPO_ID; see the module docstring for the steps."""
    validate_repo_id(repo_id)  # before any work or request
    if create_pr and revision not in (None, "main"):
        raise AdapterHubError("--create-pr opens a pull request against main", "drop --revision, or push to "
                              "the branch directly without --create-pr")
    if revision is not None and not revision.strip():
        raise AdapterHubError("--revision is empty")
    ep = endpoint()
    tok = None
    if not dry_run:  # fail fast, before fingerprinting a large model
        check_online()
        tok = resolve_token(token)
        if not tok:
            raise NoToken(ep)
    src = resolve_source(ref, registry_home)
    bases = base_models_for(src, base_model)
    record = src.record
    result = PushResult(repo_id=repo_id, endpoint=ep, kind=src.kind, dry_run=dry_run, private=private,
                        revision=revision or "main", base_models=bases, base_name=src.base_name,
                        registry_ref=getattr(record, "ref", None) if record is not None else None)

    if dry_run:
        out = _prepare_dry_run_dir(dry_run_dir)
        result.files = stage(src, out, repo_id, template=card_template, base_models=bases, copy=True)
        result.staged_dir = str(out)
        return result

    work = Path(tempfile.mkdtemp(prefix="adapters-push-"))
    try:
        staged = work / "repo"
        result.files = stage(src, staged, repo_id, template=card_template, base_models=bases, copy=False)
        up = _upload(staged, repo_id, ep, tok, private=private, revision=revision, create_pr=create_pr,
                     commit_message=commit_message or _default_message(src), registry_home=registry_home)
        result.commit_id, result.commit_url, result.pr_url, pr_revision, result.unchanged, result.url = up[:6]
        if up[6] is not None:
            result.version = up[6].version
            result.attempts = asdict(up[6].attempts)
            result.revision = up[6].tag
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if pr_revision:
        result.revision = pr_revision
    if record is not None:
        record_hub(registry_home, record.ref, repo_id, result.revision, result.commit_id)
    return result


def record_hub(registry_home, ref: str, repo_id: str, revision: str, commit_id: str):
    """registry.set_hub, once per (repo, revision, commit): a re-run adds no duplicate row."""
    from ..paths import registry_home as home
    from ..registry import open_registry

    reg = open_registry(home(registry_home))
    rec = reg.resolve(ref)
    for h in rec.hub or []:
        # a pull by commit id names the same publication as the branch it was pushed to
        if (h.get("repo_id"), h.get("commit_id")) == (repo_id, commit_id) and \
                revision in (h.get("revision") or "main", commit_id):
            return rec
    return reg.set_hub(rec.ref, repo_id, revision, commit_id)


def _default_message(src: Source) -> str:
    what = getattr(src.record, "ref", None) or Path(src.ref).name or src.ref
    return f"Upload {'adapter' if src.is_adapter else 'merged model'} {what} with adapterhub-local"


def _upload(staged: Path, repo_id: str, ep: str, token: str, *, private: bool, revision: str | None,
            create_pr: bool, commit_message: str, registry_home=None):
    api = client(token)
    with hub_errors("authentication", repo_id, ep):
        me = api.whoami()
    user = me.get("name") if isinstance(me, dict) else None
    from huggingface_hub.errors import RepositoryNotFoundError

    # look before creating: an existing repo needs no create call (which, for a repo the
    # token cannot create in, costs a 403 and a second lookup inside huggingface_hub)
    exists = True
    with hub_errors("repo lookup", repo_id, ep, user=user):
        try:
            info = api.repo_info(repo_id)
        except RepositoryNotFoundError:
            exists = False
    if not exists:
        with hub_errors("repo creation", repo_id, ep, user=user):
            api.create_repo(repo_id, private=private, exist_ok=True)
    url = f"{ep}/{repo_id}"
    rev = revision or "main"
    if rev == "main" and not create_pr:
        # the team registry: a numbered version vN, committed on the head we read and tagged
        from ..paths import registry_home as home
        from .remote import ProvenanceCache
        from .team import commit_version

        if private and exists and info.private is False:
            raise HubError(f"{repo_id} already exists and is public; --private cannot change that, nothing was "
                           "uploaded", "make the repo private in its settings first, or push to a new repo")
        v = commit_version(api, staged, repo_id, ep, token, message=commit_message,
                           cache=ProvenanceCache(home(registry_home)))
        orgs = [o.get("name") for o in me.get("orgs") or [] if isinstance(o, dict)]
        if v.unchanged and repo_id.split("/")[0] not in (user, *orgs):
            # nothing was written, so the server never said no: say it, the push did not happen
            from .errors import PermissionDenied

            raise PermissionDenied(repo_id, user)
        return v.commit_id, f"{url}/commit/{v.commit_id}", None, None, v.unchanged, f"{url}/tree/{v.tag}", v
    if rev != "main" and not create_pr:
        with hub_errors("branch creation", repo_id, ep, user=user):
            api.create_branch(repo_id, branch=rev, exist_ok=True)
    with hub_errors("reading the current head", repo_id, ep, user=user, revision=rev):
        current = api.repo_info(repo_id, revision="main" if create_pr else rev)
    before = current.sha
    if private and current.private is False:
        # create_repo ignores `private` for an existing repo: never publish what was meant to be private
        raise HubError(f"{repo_id} already exists and is public; --private cannot change that, nothing was "
                       "uploaded", "make the repo private in its settings first, or push to a new repo")
    with hub_errors("upload", repo_id, ep, user=user, resumable=True, revision=rev):
        info = api.upload_folder(repo_id=repo_id, folder_path=staged, commit_message=commit_message,
                                 revision=None if create_pr else rev, create_pr=create_pr or None)
    unchanged = info.oid == before and not info.pr_url
    if rev != "main" and not create_pr:
        url = f"{url}/tree/{rev}"
    return info.oid, info.commit_url, info.pr_url, info.pr_revision, unchanged, url, None
