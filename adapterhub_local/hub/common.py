"""What push and pull share: repo ids, the endpoint, the token, a client.

The endpoint is read from ``HF_ENDPOINT`` when the command runs (not when
huggingface_hub was imported) and passed to every call explicitly, so a library
caller that sets the variable late still reaches the server it meant.
"""

from __future__ import annotations

import os
import re

from .errors import InvalidRepoId, OfflineMode

DEFAULT_ENDPOINT = "https://huggingface.co"
_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?$")


def validate_repo_id(repo_id: str) -> str:
    """NAMESPACE/NAME as the Hub accepts it; raises InvalidRepoId before any request is made."""
    if not isinstance(repo_id, str) or not repo_id:
        raise InvalidRepoId(str(repo_id), "it is empty")
    if repo_id.count("/") != 1:
        raise InvalidRepoId(repo_id, "it must have exactly one '/' between namespace and name")
    namespace, name = repo_id.split("/")
    for label, part in (("namespace", namespace), ("name", name)):
        if not part:
            raise InvalidRepoId(repo_id, f"the {label} is empty")
        if not _PART.match(part):
            raise InvalidRepoId(repo_id, f"the {label} {part!r} may only use letters, digits, '-', '_' and '.', "
                                "may not start or end with '-' or '.', and is at most 96 characters")
        if "--" in part or ".." in part:
            raise InvalidRepoId(repo_id, "'--' and '..' are not allowed")
    if name.endswith(".git"):
        raise InvalidRepoId(repo_id, "the name may not end in .git")
    return repo_id


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


def client(token: str | None):
    from huggingface_hub import HfApi

    from .. import __version__

    return HfApi(endpoint=endpoint(), token=token, library_name="adapterhub-local", library_version=__version__)
