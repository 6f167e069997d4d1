"""A small Hugging Face Hub-compatible server for tests: stdlib only, loopback only.

It implements what `huggingface_hub` 2.x sends for create_repo, upload_folder (regular
and LFS basic-transfer uploads), create_branch, model_info / repo_info, list_repo_tree,
list_repo_refs, whoami, hf_hub_download and snapshot_download, with:

- token auth (``users={token: username}``): an unknown token gets 401 with the Hub's
  "Invalid credentials in Authorization header" message; a private repo is a 404
  (RepoNotFound) to anyone but its owner; writing to another user's repo is a 403;
- git-like state: every commit gets a 40-hex id, branches point at commits, a commit
  with ``create_pr=1`` opens ``refs/pr/N``;
- ``resolve`` answers with ``X-Repo-Commit`` and ``ETag`` (``X-Linked-Etag`` /
  ``X-Linked-Size`` for LFS files), as the client requires;
- tags as the Hub keeps them: ``create_tag`` (409 on an existing tag), ``delete_tag``,
  ``list_repo_refs``; every revision (model_info, tree, resolve) may be a tag;
- ``list_models`` with ``author`` / ``filter`` (tags, read from the README's YAML as
  the Hub does), ``cardData`` and Link-header pagination;
- commits on an explicit parent: ``parentCommit`` that is not the branch head is a 412
  ("A commit has happened since. Please refresh and try again."), as on the Hub;
- fault injection for tests: ``fail_commits`` (answer the next N commit requests with a
  500), ``drop_commits`` (close the connection on the next N commit requests, as a
  server that dies mid-upload would) and ``commit_delay`` (seconds each commit request
  waits before it is applied, outside the lock, so concurrent pushes really overlap);
- ``hostile``: a dict that turns the server into a liar: ``commit_id`` (reported for every
  commit), ``names`` (extra file names listed), ``sha256`` / ``sizes`` ({path: lie} in
  the listing), ``serve`` ({path: other bytes} sent), ``truncate`` ({path: N}: the full length announced, N
  bytes sent, then the connection closed), ``tags`` ({name: commit} extra
  tags), ``stall`` ((path part, seconds) before answering), ``fail`` ((path part,
  status)), ``redirect`` (a URL prefix every download is sent to), ``listing`` (N
  junk repos appended to list_models), ``listing_sha`` (the head every listed repo is
  said to have: None, junk) and ``empty_pages`` (N listing pages with no repo and a next
  link back to the same query, as a broken or hostile server could send forever);
- ``requests``: every request seen, so a test can assert that nothing was sent, or count.

Usage::

    with HubServer(users={"tok": "alice"}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "tok"}
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

LFS_THRESHOLD = 10 * 1024  # files above this size (or *.safetensors / *.bin) go through LFS
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def git_blob_sha1(data: bytes) -> str:
    h = hashlib.sha1(f"blob {len(data)}\0".encode())
    h.update(data)
    return h.hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class FileEntry:
    path: str
    size: int
    sha256: str
    lfs: bool
    oid: str = ""  # the git blob id: of the content, or of the LFS pointer for LFS files


@dataclass
class Commit:
    id: str
    parent: str | None
    files: dict[str, FileEntry]
    title: str
    date: float


@dataclass
class Repo:
    id: str
    owner: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit id
    prs: dict[int, str] = field(default_factory=dict)  # number -> commit id
    commits: dict[str, Commit] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # name -> commit id
    lfs: set[str] = field(default_factory=set)  # LFS objects uploaded to this repo (sha256)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.body = body or {}
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


class HubState:
    def __init__(self, data_dir: Path, users: dict[str, str], orgs: dict[str, list[str]] | None = None):
        self.data_dir = data_dir
        (data_dir / "objects").mkdir(parents=True, exist_ok=True)
        self.users = dict(users)  # token -> username
        self.orgs = dict(orgs or {})  # username -> org names they can write to
        self.repos: dict[str, Repo] = {}
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str]] = []
        self.auth_seen: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.fail_commits = 0
        self.drop_commits = 0
        self.commit_delay = 0.0
        self.on_commit = None  # test hook: called as on_commit(repo, commit) after a commit lands
        self.hostile: dict = {}  # see Hostile
        self.card_cache: dict[str, dict | None] = {}  # README sha256 -> its YAML header
        self.page_size = 1000  # list_models page size (the Hub's is 1000 too)
        self.secret = os.urandom(16)
        self.base_url = ""

    # -- storage -------------------------------------------------------------------
    def object_path(self, sha256: str) -> Path:
        return self.data_dir / "objects" / sha256

    def has_object(self, sha256: str) -> bool:
        return self.object_path(sha256).is_file()

    def store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.object_path(sha)
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return sha

    def read(self, sha256: str) -> bytes:
        return self.object_path(sha256).read_bytes()

    def entry(self, path: str, sha256: str, size: int, lfs: bool) -> FileEntry:
        oid = git_blob_sha1(lfs_pointer(sha256, size) if lfs else self.read(sha256))
        return FileEntry(path=path, size=size, sha256=sha256, lfs=lfs, oid=oid)

    # -- auth ----------------------------------------------------------------------
    def user_for(self, authorization: str | None) -> str | None:
        """The user a request acts as; None when anonymous. Raises 401 for a bad token."""
        if not authorization:
            return None
        token = authorization.split(" ", 1)[1] if authorization.lower().startswith("bearer ") else ""
        user = self.users.get(token.strip())
        if user is None:
            raise HubError(401, INVALID_CREDENTIALS)
        return user

    def can_write_namespace(self, user: str | None, namespace: str) -> bool:
        return user is not None and (namespace == user or namespace in self.orgs.get(user, []))

    def repo_for_read(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self.can_write_namespace(user, repo.owner)):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def repo_for_write(self, repo_id: str, user: str | None) -> Repo:
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repository")
        repo = self.repo_for_read(repo_id, user)
        if not self.can_write_namespace(user, repo.owner):
            raise HubError(403, f"You don't have the rights to write to {repo_id}: it belongs to {repo.owner}")
        return repo

    # -- git-ish -------------------------------------------------------------------
    def resolve_rev(self, repo: Repo, rev: str) -> Commit:
        rev = unquote(rev)
        if rev in repo.branches:
            return repo.commits[repo.branches[rev]]
        if rev in repo.tags:
            return repo.commits[repo.tags[rev]]
        if rev.startswith("refs/tags/") and rev[10:] in repo.tags:
            return repo.commits[repo.tags[rev[10:]]]
        m = re.fullmatch(r"refs/pr/(\d+)", rev)
        if m and int(m.group(1)) in repo.prs:
            return repo.commits[repo.prs[int(m.group(1))]]
        if rev.startswith("refs/heads/") and rev[11:] in repo.branches:
            return repo.commits[repo.branches[rev[11:]]]
        if re.fullmatch(r"[0-9a-f]{40}", rev) and rev in repo.commits:
            return repo.commits[rev]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def new_commit(self, repo: Repo, parent: Commit | None, files: dict[str, FileEntry], title: str) -> Commit:
        h = hashlib.sha1()
        h.update((parent.id if parent else "").encode())
        h.update(title.encode())
        h.update(repr(time.time_ns()).encode())
        for path in sorted(files):
            h.update(f"{path}\0{files[path].sha256}\n".encode())
        commit = Commit(id=h.hexdigest(), parent=parent.id if parent else None, files=files, title=title,
                        date=time.time())
        repo.commits[commit.id] = commit
        return commit

    def create_repo(self, repo_id: str, owner: str, private: bool) -> Repo:
        repo = Repo(id=repo_id, owner=owner, private=private)
        attrs = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
        sha = self.store(attrs)
        files = {".gitattributes": self.entry(".gitattributes", sha, len(attrs), False)}
        repo.branches["main"] = self.new_commit(repo, None, files, "initial commit").id
        self.repos[repo_id] = repo
        return repo

    def file_list(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        """Test helper: {path: content} at a revision (no auth)."""
        repo = self.repos[repo_id]
        commit = self.resolve_rev(repo, rev)
        return {p: self.read(e.sha256) for p, e in commit.files.items()}


def card_data(commit: Commit, st: HubState) -> dict | None:
    """The YAML header of the commit's README.md, as the Hub parses it for cardData."""
    e = commit.files.get("README.md")
    if e is None:
        return None
    if e.sha256 not in st.card_cache:
        st.card_cache[e.sha256] = _parse_card(st.read(e.sha256))
    return st.card_cache[e.sha256]


def _parse_card(data: bytes) -> dict | None:
    import yaml

    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", data.decode("utf-8", "replace"), re.DOTALL)
    if not m:
        return None
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return None
    return meta if isinstance(meta, dict) else None


def card_tags(commit: Commit, st: HubState) -> list[str]:
    meta = card_data(commit, st) or {}
    tags = meta.get("tags") or []
    out = [str(t) for t in tags] if isinstance(tags, list) else []
    if isinstance(meta.get("library_name"), str):
        out.append(meta["library_name"])
    return out


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tiny-hub/1.0"
    state: HubState  # set on the subclass the server builds

    def log_message(self, format, *args):
        pass

    def setup(self):
        super().setup()
        # headers and body leave in two writes: without TCP_NODELAY, Nagle's algorithm and the
        # client's delayed ACK hold the second one ~40 ms, for every request
        import socket

        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # -- plumbing ------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                line = self.rfile.readline().strip()
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json", head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None, head: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), headers, head=head)

    def _error(self, err: HubError, head: bool = False) -> None:
        headers = {"X-Error-Message": err.message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json(err.status, {"error": err.message, **err.body}, headers, head=head)

    def _dispatch(self, method: str) -> None:
        st = self.state
        url = urlsplit(self.path)
        with st.lock:
            st.requests.append((method, url.path))
            st.auth_seen.append((method, url.path, self.headers.get("Authorization")))
        query = {k: v if k == "expand" else v[-1] for k, v in parse_qs(url.query).items()}
        body = b"" if method in ("GET", "HEAD") else self._body()
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        stall = st.hostile.get("stall")
        if stall and stall[0] in url.path:
            time.sleep(stall[1])  # a server that stops answering (the client's timeout must end it)
        fail = st.hostile.get("fail")
        if fail and fail[0] in url.path:
            return self._error(HubError(fail[1], "hostile failure"), head=method == "HEAD")
        if st.commit_delay and method == "POST" and len(parts) >= 5 and parts[:2] == ["api", "models"] \
                and parts[4] == "commit":
            time.sleep(st.commit_delay)  # outside the lock: concurrent commits overlap here
        try:
            user = st.user_for(self.headers.get("Authorization"))
            with st.lock:
                self._route(method, parts, query, body, user, url.path)
        except _Dropped:
            self.close_connection = True
        except HubError as e:
            self._error(e, head=method == "HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # -- routes --------------------------------------------------------------------
    def _route(self, method, parts, query, body, user, raw_path):
        st = self.state
        if parts[:2] == ["api", "whoami-v2"] and method == "GET":
            if user is None:
                raise HubError(401, INVALID_CREDENTIALS)
            return self._json(200, {"type": "user", "name": user, "fullname": user,
                                    "orgs": [{"name": o} for o in st.orgs.get(user, [])],
                                    "auth": {"type": "access_token",
                                             "accessToken": {"displayName": "test", "role": "write"}}})
        if parts[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(json.loads(body or b"{}"), user)
        if parts[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml(json.loads(body or b"{}"))
        if parts == ["api", "models"] and method == "GET":
            return self._list_models(query, user)
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = f"{parts[2]}/{parts[3]}"
            rest = parts[4:]
            if method == "GET" and not rest:
                return self._model_info(repo_id, "main", query, user)
            if method == "GET" and rest[0] == "revision" and len(rest) >= 2:
                return self._model_info(repo_id, "/".join(rest[1:]), query, user)
            if method == "GET" and rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), query, user)
            if method == "GET" and rest == ["refs"]:
                return self._refs(repo_id, user)
            if method == "POST" and rest[0] == "preupload" and len(rest) >= 2:
                return self._preupload(repo_id, "/".join(rest[1:]), query, json.loads(body or b"{}"), user)
            if method == "POST" and rest[0] == "commit" and len(rest) >= 2:
                return self._commit(repo_id, "/".join(rest[1:]), query, body, user)
            if method == "POST" and rest[0] == "branch" and len(rest) >= 2:
                return self._branch(repo_id, "/".join(rest[1:]), json.loads(body or b"{}"), user)
            if method == "POST" and rest[0] == "tag" and len(rest) >= 2:
                return self._create_tag(repo_id, "/".join(rest[1:]), json.loads(body or b"{}"), user)
            if method == "DELETE" and rest[0] == "tag" and len(rest) >= 2:
                return self._delete_tag(repo_id, "/".join(rest[1:]), user)
        if parts and parts[0] == "_lfs" and method == "PUT" and len(parts) == 4:
            return self._lfs_put(f"{parts[1]}/{parts[2]}", parts[3], query, body)
        if len(parts) >= 5 and parts[1].endswith(".git") and parts[2:5] == ["info", "lfs", "objects"]:
            repo_id = f"{parts[0]}/{parts[1][:-4]}"
            if parts[5:] == ["batch"] and method == "POST":
                return self._lfs_batch(repo_id, json.loads(body or b"{}"), user)
            if parts[5:] == ["verify"] and method == "POST":
                return self._lfs_verify(repo_id, json.loads(body or b"{}"), user)
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            # /{ns}/{name}/resolve/{rev}/{path...}; the revision is one %-quoted segment
            raw = raw_path.split("/")
            return self._resolve(f"{parts[0]}/{parts[1]}", unquote(raw[4]),
                                 "/".join(unquote(p) for p in raw[5:]), user, head=method == "HEAD")
        raise HubError(404, f"no route for {method} {raw_path}")

    def _create_repo(self, payload, user):
        st = self.state
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        if payload.get("type", "model") not in ("model", None):
            raise HubError(400, "only model repos are supported by this test server")
        name = payload.get("name") or ""
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{name}"
        if not st.can_write_namespace(user, namespace):
            raise HubError(403, f"You don't have the rights to create a model under the namespace \"{namespace}\"")
        url = f"{st.base_url}/{repo_id}"
        if repo_id in st.repos:
            raise HubError(409, "You already created this model repo", body={"url": url})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        st.create_repo(repo_id, namespace, private)
        return self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload):
        import yaml

        content = payload.get("content", "")
        errors = []
        m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        if m:
            try:
                meta = yaml.safe_load(m.group(1))
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {e}"})
        if errors:
            return self._json(400, {"errors": errors, "warnings": []})
        warnings = [] if m else [{"message": "empty or missing yaml metadata in repo card"}]
        return self._json(200, {"errors": [], "warnings": warnings})

    def _cid(self, commit_id: str) -> str:
        """The commit id as this server reports it (a hostile one lies)."""
        return self.state.hostile.get("commit_id") or commit_id

    def _sibling(self, e: FileEntry, blobs: bool) -> dict:
        d = {"rfilename": e.path}
        if blobs:
            h = self.state.hostile
            size = h.get("sizes", {}).get(e.path, e.size)
            sha = h.get("sha256", {}).get(e.path, e.sha256)
            d.update(size=size, blobId=e.oid)
            if e.lfs:
                d["lfs"] = {"size": size, "sha256": sha, "pointerSize": len(lfs_pointer(e.sha256, e.size))}
        return d

    def _list_models(self, query, user):
        """GET /api/models?author=&filter=&cardData=&full=&expand=, paged by a Link header.

        The fields are the Hub's for that request (huggingface_hub hf_api.py ``list_models``:
        ``expand`` returns only the properties named, and cannot be combined with ``full`` or
        ``cardData``; ``full`` adds ``sha``, ``lastModified``, ``author`` and the files; by
        default neither ``sha`` nor ``lastModified`` is sent, so a client must ask for them)."""
        st = self.state
        if st.hostile.get("empty_pages"):
            st.hostile["empty_pages"] -= 1
            again = f'<{st.base_url}/api/models?{urlencode(query, doseq=True)}>; rel="next"'
            return self._json(200, [], {"Link": again})
        author, wanted = query.get("author"), query.get("filter")
        with_card = query.get("cardData", "").lower() in ("1", "true")
        full = query.get("full", "").lower() in ("1", "true")
        expand = query.get("expand")
        known = {"author", "cardData", "createdAt", "downloads", "lastModified", "likes", "private", "sha",
                 "siblings", "tags"}
        if expand and (full or with_card):
            raise HubError(400, "expand cannot be used with full or cardData")
        if expand and not set(expand) <= known:
            raise HubError(400, f"invalid expand value(s): {sorted(set(expand) - known)}")
        items = []
        for repo in st.repos.values():
            if repo.private and not st.can_write_namespace(user, repo.owner):
                continue
            if author and repo.owner != author:
                continue
            head = repo.commits[repo.branches["main"]]
            tags = card_tags(head, st)
            if wanted and wanted not in tags:
                continue
            sha = st.hostile.get("listing_sha", self._cid(head.id))  # a server that says no head, or lies
            every = {"author": repo.owner, "sha": sha, "private": repo.private, "tags": tags,
                     "lastModified": _iso(head.date), "createdAt": _iso(head.date), "downloads": 0, "likes": 0,
                     "siblings": [{"rfilename": p} for p in sorted(head.files)]}
            if expand:
                item = {"_id": repo.id, "id": repo.id}
                item.update({k: (card_data(head, st) or {}) if k == "cardData" else every[k] for k in expand})
            else:
                shown = ("private", "tags", "createdAt", "downloads", "likes")
                if full:
                    shown += ("author", "sha", "lastModified", "siblings")
                item = {"_id": repo.id, "id": repo.id, "modelId": repo.id, **{k: every[k] for k in shown}}
                if with_card:
                    item["cardData"] = card_data(head, st) or {}
            items.append(item)
        for i in range(int(st.hostile.get("listing", 0))):
            items.append({"_id": f"{author or 'x'}/junk-{i}", "id": f"{author or 'x'}/junk-{i}",
                          "author": author or "x", "tags": [wanted] if wanted else [], "private": False})
        start = int(query.get("cursor") or 0)
        page = items[start:start + st.page_size]
        headers = {}
        if start + st.page_size < len(items):
            q = {k: v for k, v in query.items() if k != "cursor"}
            nxt = urlencode(q, doseq=True)
            headers["Link"] = f'<{st.base_url}/api/models?{nxt}&cursor={start + st.page_size}>; rel="next"'
        return self._json(200, page, headers)

    def _create_tag(self, repo_id, rev, payload, user):
        st = self.state
        repo = st.repo_for_write(repo_id, user)
        tag = payload.get("tag") or ""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", tag):
            raise HubError(400, f"Invalid tag name {tag!r}")
        commit = st.resolve_rev(repo, rev)
        if tag in repo.tags or tag in repo.branches:
            raise HubError(409, f"Tag {tag} already exists")
        repo.tags[tag] = commit.id
        return self._json(200, {})

    def _delete_tag(self, repo_id, tag, user):
        st = self.state
        repo = st.repo_for_write(repo_id, user)
        tag = unquote(tag)
        if tag not in repo.tags:
            raise HubError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
        del repo.tags[tag]
        return self._json(200, {})

    def _model_info(self, repo_id, rev, query, user):
        st = self.state
        repo = st.repo_for_read(repo_id, user)
        commit = st.resolve_rev(repo, rev)
        blobs = query.get("blobs", "").lower() in ("1", "true")
        return self._json(200, {
            "_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo.owner, "sha": self._cid(commit.id),
            "private": repo.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
            "tags": card_tags(commit, st), "lastModified": _iso(commit.date), "createdAt": _iso(commit.date),
            "siblings": [self._sibling(commit.files[p], blobs) for p in sorted(commit.files)]
            + [{"rfilename": n, "size": 1, "blobId": "0" * 40} for n in st.hostile.get("names", [])],
        })

    def _tree(self, repo_id, rev, path, query, user):
        st = self.state
        repo = st.repo_for_read(repo_id, user)
        commit = st.resolve_rev(repo, rev)
        recursive = query.get("recursive", "").lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        out, dirs = [], set()
        for p in sorted(commit.files):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix):]
            segs = rel.split("/")
            for i in range(1, len(segs)):
                if recursive or i == 1:
                    dirs.add(prefix + "/".join(segs[:i]))
            if len(segs) > 1 and not recursive:
                continue
            e = commit.files[p]
            item = {"type": "file", "oid": e.oid, "size": e.size, "path": p}
            if e.lfs:
                item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": len(lfs_pointer(e.sha256, e.size))}
            out.append(item)
        if path.strip("/") and not out and not dirs:
            raise HubError(404, f"{path} does not exist", "EntryNotFound")
        folders = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                   for d in sorted(dirs)]
        return self._json(200, folders + out)

    def _refs(self, repo_id, user):
        repo = self.state.repo_for_read(repo_id, user)
        return self._json(200, {
            "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": self._cid(c)}
                         for b, c in repo.branches.items()],
            "converts": [],
            "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": self._cid(c)}
                     for t, c in repo.tags.items()] + [
                {"name": t, "ref": f"refs/tags/{t}", "targetCommit": c}
                for t, c in (self.state.hostile.get("tags") or {}).items()],
            "pullRequests": [{"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": c}
                             for n, c in repo.prs.items()],
        })

    def _branch(self, repo_id, branch, payload, user):
        st = self.state
        repo = st.repo_for_write(repo_id, user)
        branch = unquote(branch)
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = st.resolve_rev(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start.id
        return self._json(200, {})

    def _preupload(self, repo_id, rev, query, payload, user):
        st = self.state
        repo = st.repo_for_write(repo_id, user)
        create_pr = query.get("create_pr") == "1"
        commit = st.resolve_rev(repo, "main" if create_pr else rev)
        files = []
        for f in payload.get("files", []):
            path, size = f["path"], int(f.get("size", 0))
            lfs = size > LFS_THRESHOLD or path.endswith((".safetensors", ".bin", ".pt"))
            existing = commit.files.get(path)
            oid = None
            if existing is not None and existing.lfs == lfs:
                oid = existing.sha256 if lfs else existing.oid
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        return self._json(200, {"files": files, "commitOid": commit.id})

    def _sign(self, repo_id: str, oid: str) -> str:
        return hmac.new(self.state.secret, f"{repo_id}\0{oid}".encode(), hashlib.sha256).hexdigest()[:32]

    def _lfs_batch(self, repo_id, payload, user):
        st = self.state
        repo = st.repo_for_write(repo_id, user)
        if payload.get("operation") != "upload":
            raise HubError(400, "only uploads are supported")
        objects = []
        for o in payload.get("objects", []):
            oid, size = o["oid"], int(o["size"])
            item = {"oid": oid, "size": size, "authenticated": True}
            if oid not in repo.lfs:
                item["actions"] = {
                    "upload": {"href": f"{st.base_url}/_lfs/{repo_id}/{oid}?sig={self._sign(repo_id, oid)}",
                               "header": {}},
                    "verify": {"href": f"{st.base_url}/{repo_id}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(item)
        return self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                          content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, repo_id, oid, query, body):
        st = self.state
        if not hmac.compare_digest(query.get("sig", ""), self._sign(repo_id, oid)) or repo_id not in st.repos:
            raise HubError(403, "bad upload signature")
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "uploaded content does not match its sha256 oid")
        st.store(body)
        st.repos[repo_id].lfs.add(oid)
        return self._send(200, b"", content_type="text/plain")

    def _lfs_verify(self, repo_id, payload, user):
        st = self.state
        repo = st.repo_for_write(repo_id, user)
        oid = payload.get("oid", "")
        if oid not in repo.lfs or st.object_path(oid).stat().st_size != int(payload.get("size", -1)):
            raise HubError(422, f"object {oid} was not uploaded")
        return self._json(200, {})

    def _commit(self, repo_id, rev, query, body, user):
        st = self.state
        repo = st.repo_for_write(repo_id, user)
        if st.drop_commits > 0:
            st.drop_commits -= 1
            raise _Dropped()
        if st.fail_commits > 0:
            st.fail_commits -= 1
            raise HubError(500, "Internal Error - We're working hard to fix this as soon as possible!")
        create_pr = query.get("create_pr") == "1"
        base = st.resolve_rev(repo, "main" if create_pr else rev)
        files = dict(base.files)
        header = {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "only base64 file content is supported")
                data = base64.b64decode(value["content"])
                files[value["path"]] = st.entry(value["path"], st.store(data), len(data), False)
            elif key == "lfsFile":
                oid = value["oid"]
                if oid not in repo.lfs:
                    raise HubError(400, f"LFS object {oid} for {value['path']} was never uploaded")
                size = st.object_path(oid).stat().st_size
                files[value["path"]] = st.entry(value["path"], oid, size, True)
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for p in [p for p in files if p.startswith(prefix)]:
                    del files[p]
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        parent = header.get("parentCommit")
        if parent and parent != base.id:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        commit = st.new_commit(repo, base, files, header.get("summary") or "commit")
        if st.on_commit is not None:
            st.on_commit(repo, commit)
        out = {"commitUrl": f"{st.base_url}/{repo_id}/commit/{commit.id}", "commitOid": commit.id,
               "success": True}
        if create_pr:
            num = max(repo.prs, default=0) + 1
            repo.prs[num] = commit.id
            out["pullRequestUrl"] = f"{st.base_url}/{repo_id}/discussions/{num}"
        else:
            repo.branches[unquote(rev)] = commit.id
        return self._json(200, out)

    def _resolve(self, repo_id, rev, path, user, head):
        st = self.state
        repo = st.repo_for_read(repo_id, user)
        commit = st.resolve_rev(repo, rev)
        e = commit.files.get(path)
        if e is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.id})
        h = st.hostile
        if h.get("redirect") and not head:
            return self._send(302, b"", {"Location": h["redirect"] + "/" + path}, content_type="text/plain")
        headers = {"X-Repo-Commit": self._cid(commit.id), "Accept-Ranges": "none"}
        if e.lfs:
            headers.update({"ETag": f'"{e.sha256}"', "X-Linked-Etag": f'"{e.sha256}"',
                            "X-Linked-Size": str(e.size)})
        else:
            headers["ETag"] = f'"{e.oid}"'
        data = h.get("serve", {}).get(path, st.read(e.sha256))
        cut = h.get("truncate", {}).get(path)
        if head or cut is not None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if head:
                return None
            # announce every byte, send some, hang up: a download cut off mid-file
            self.wfile.write(data[:cut])
            self.wfile.flush()
            raise _Dropped()
        return self._send(200, data, headers, content_type="application/octet-stream")


class _Dropped(Exception):
    """Close the connection without an answer (a server dying mid-request)."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # snapshot_download opens several connections at once

    def handle_error(self, request, client_address):
        # a client that hangs up mid-answer (an aborted upload) is normal here, not a server bug
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class HubServer:
    """The server on 127.0.0.1:<free port>, in a daemon thread, with a temp data dir."""

    def __init__(self, users: dict[str, str] | None = None, orgs: dict[str, list[str]] | None = None,
                 data_dir: str | os.PathLike | None = None):
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="tiny-hub-"))
        self.state = HubState(self.data_dir, users or {}, orgs)
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = _Server(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.state.base_url = self.url
        self._thread: threading.Thread | None = None

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="tiny-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.httpd.server_close()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- test helpers --------------------------------------------------------------
    @property
    def requests(self) -> list[tuple[str, str]]:
        with self.state.lock:
            return list(self.state.requests)

    def clear_requests(self) -> None:
        with self.state.lock:
            self.state.requests.clear()

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        with self.state.lock:
            return self.state.file_list(repo_id, rev)

    def head(self, repo_id: str, rev: str = "main") -> str:
        with self.state.lock:
            return self.state.resolve_rev(self.state.repos[repo_id], rev).id

    def is_lfs(self, repo_id: str, path: str, rev: str = "main") -> bool:
        with self.state.lock:
            return self.state.resolve_rev(self.state.repos[repo_id], rev).files[path].lfs

    def tags(self, repo_id: str) -> dict[str, str]:
        with self.state.lock:
            return dict(self.state.repos[repo_id].tags)

    def add_tag(self, repo_id: str, tag: str, commit_id: str) -> None:
        with self.state.lock:
            self.state.repos[repo_id].tags[tag] = commit_id

    def commit_chain(self, repo_id: str, rev: str = "main") -> list[str]:
        """Commit ids from ``rev`` back to the first commit."""
        with self.state.lock:
            repo = self.state.repos[repo_id]
            out, c = [], self.state.resolve_rev(repo, rev)
            while c is not None:
                out.append(c.id)
                c = repo.commits.get(c.parent) if c.parent else None
            return out

    def count(self, method: str | None = None, contains: str = "") -> int:
        """How many requests were seen (of a method, with a path containing a string)."""
        return sum(1 for m, p in self.requests if (method is None or m == method) and contains in p)

    def add_repo(self, repo_id: str, files: dict[str, bytes], owner: str | None = None,
                 private: bool = False) -> str:
        """Create a repo with ``files`` directly (no client involved); returns the commit id."""
        st = self.state
        with st.lock:
            repo = st.repos.get(repo_id) or st.create_repo(repo_id, owner or repo_id.split("/")[0], private)
            base = st.resolve_rev(repo, "main")
            entries = dict(base.files)
            for path, data in files.items():
                lfs = len(data) > LFS_THRESHOLD or path.endswith((".safetensors", ".bin"))
                entries[path] = st.entry(path, st.store(data), len(data), lfs)
                if lfs:
                    repo.lfs.add(entries[path].sha256)
            commit = st.new_commit(repo, base, entries, "add files")
            repo.branches["main"] = commit.id
            return commit.id


if __name__ == "__main__":  # a manual playground: python tests/hubserver.py
    srv = HubServer(users={"hf_test": "me"}).start()
    print(f"HF_ENDPOINT={srv.url} HF_TOKEN=hf_test HF_HUB_DISABLE_XET=1", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()
