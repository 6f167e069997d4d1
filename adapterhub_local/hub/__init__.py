"""Publish to and pull from a Hugging Face Hub (or a self-hosted one via HF_ENDPOINT).

    from adapterhub_local.hub import push, pull
    push("support:prod", "my-team/support-lora")        # card + adapterhub.json + upload
    pull("my-team/support-lora@main", name="support")   # into the registry, lineage intact

huggingface_hub is imported only inside the functions that talk to the network.
"""

from __future__ import annotations

from .errors import (
    AuthFailed,
    HubError,
    HubServerError,
    HubUnreachable,
    InvalidRepoId,
    NotALoraRepo,
    NoToken,
    PermissionDenied,
    RepoNotFound,
)


def push(*args, **kwargs):
    from .push import push as _push

    return _push(*args, **kwargs)


def pull(*args, **kwargs):
    from .pull import pull as _pull

    return _pull(*args, **kwargs)


__all__ = [
    "AuthFailed",
    "HubError",
    "HubServerError",
    "HubUnreachable",
    "InvalidRepoId",
    "NoToken",
    "NotALoraRepo",
    "PermissionDenied",
    "RepoNotFound",
    "pull",
    "push",
]
