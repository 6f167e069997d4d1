"""What push and pull share: repo ids, the endpoint, the token, a client.

The endpoint is read from ``HF_ENDPOINT`` when the command runs (not when
huggingface_hub was imported) and passed to every call explicitly, so a library
caller that sets the variable late still reaches the server it meant.
"""

from __future__ import annotations

import os
import re

from ..repo_id import repo_id_problem
from .errors import InvalidRepoId, OfflineMode

DEFAULT_ENDPOINT = "https://huggingface.co"


def validate_repo_id(repo_id: str) -> str:
    """NAMESPACE/NAME as the Hub accepts it (the rule: repo_id.py); raises InvalidRepoId
    before any request is made."""
    problem = repo_id_problem(repo_id)
    if problem:
        raise InvalidRepoId(str(repo_id), problem)
    return repo_id


def validate_namespace(org: str) -> str:
    """A user or organisation name (what `remote list` and `sync` take), checked with the
    repo-id rule before any request; ORG/NAME is named as the mistake it is."""
    from .errors import HubError

    if isinstance(org, str) and "/" in org:
        raise HubError(f"{org!r} is a repo; this takes a namespace (a user or organisation)",
                       f"give the part before '/': {org.split('/', 1)[0]!r}")
    problem = repo_id_problem(f"{org}/x")
    if problem:
        raise HubError(f"invalid namespace {org!r}: {problem}", "a user or organisation name, e.g. my-team")
    return org


def split_repo_spec(spec: str) -> tuple[str, str | None]:
    """``REPO_ID[@REVISION]`` -> (repo_id, revision or None)."""
    repo_id, sep, revision = spec.partition("@")
    if sep and not revision:
        raise InvalidRepoId(spec, "nothing after '@' (give a branch, tag or commit id)")
    return validate_repo_id(repo_id), (revision or None)


def endpoint() -> str:
    """``HF_ENDPOINT`` (a self-hosted Hub), else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def resolve_token(explicit: str | None = None) -> str | None:
    """--token, else HF_TOKEN, else the token `hf auth login` stored; None when there is none."""
    if explicit:
        return explicit.strip()
    from huggingface_hub import get_token

    return get_token()


def check_online() -> None:
    """huggingface_hub blocks every request under HF_HUB_OFFLINE: say so up front."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise OfflineMode()


COMMIT_RE = re.compile(r"^[0-9a-f]{40}\Z")  # \Z: "$" would let a trailing newline in
# a tag or branch name we act on: git's rules are looser, ours are what the Hub lets us create
REF_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
DEFAULT_TIMEOUT = 60.0  # seconds without a byte before a request is given up (ADAPTERS_HUB_TIMEOUT)


def check_commit_id(value, repo_id: str, what: str = "commit id") -> str:
    """A commit id from the server: exactly 40 lowercase hex characters (it ends up in paths
    and in the registry), else one error line naming the repo."""
    from .errors import HubError

    if not isinstance(value, str) or not COMMIT_RE.match(value):
        raise HubError(f"{repo_id}: the Hub answered with an invalid {what} {_show(value)}",
                       "a commit id is 40 hex characters; this server is broken or hostile")
    return value


def check_file_name(name, repo_id: str) -> str:
    """A file name from the server: relative, forward slashes, no '..', no empty, absolute,
    backslash, drive or control-character parts."""
    from .errors import HubError

    ok = isinstance(name, str) and 0 < len(name) <= 1024 and "\\" not in name and not name.startswith("/") \
        and not re.match(r"^[A-Za-z]:", name) and not any(ord(c) < 32 or ord(c) == 127 for c in name)
    if ok:
        parts = name.split("/")
        ok = all(p not in ("", ".", "..") for p in parts)
    if not ok:
        raise HubError(f"{repo_id}: the Hub lists a file name that is not a safe relative path: {_show(name)}",
                       "refusing the whole repo; this server is broken or hostile")
    return name


def _show(value) -> str:
    """A server value for an error line: repr (escapes control characters), cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def timeout() -> float:
    try:
        t = float(os.environ.get("ADAPTERS_HUB_TIMEOUT") or DEFAULT_TIMEOUT)
    except ValueError:
        t = DEFAULT_TIMEOUT
    return t if t > 0 else DEFAULT_TIMEOUT


_installed_timeout: float | None = None


def install_timeout() -> None:
    """huggingface_hub's API calls run with no timeout at all (utils/_http.py
    default_client_factory: ``timeout=None``): a server that stalls would hang the
    command forever. Give its shared client a read timeout (ADAPTERS_HUB_TIMEOUT)."""
    global _installed_timeout
    t = timeout()
    if _installed_timeout == t:
        return
    import httpx2
    from huggingface_hub.utils import _http

    def factory():
        c = _http.default_client_factory()
        c.timeout = httpx2.Timeout(t)
        return c

    _http.set_client_factory(factory)  # also closes the current shared client
    _installed_timeout = t


def client(token: str | None):
    from huggingface_hub import HfApi

    from .. import __version__

    install_timeout()
    return HfApi(endpoint=endpoint(), token=token, library_name="adapterhub-local", library_version=__version__)
