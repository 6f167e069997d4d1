"""Publish to and pull from a Hugging Face Hub (or a self-hosted one via HF_ENDPOINT).

    from adapterhub_local.hub import push, pull
    push("support:prod", "my-team/support-lora")        # the repo's next version vN (team.py)
    pull("my-team/support-lora:prod", name="support")   # into the registry, lineage intact
    remote_list("my-team", where=["eval_loss<1.2"])     # the team's versions (listing.py)
    set_alias("my-team/support-lora", "prod", "v3")     # a Hub tag
    sync("my-team", weights=True)                       # what this registry lacks

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


def remote_list(*args, **kwargs):
    from .listing import remote_list as _list

    return _list(*args, **kwargs)


def sync(*args, **kwargs):
    from .sync import sync as _sync

    return _sync(*args, **kwargs)


def set_alias(*args, **kwargs):
    from .team import set_alias as _set_alias

    return _set_alias(*args, **kwargs)


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
    "remote_list",
    "set_alias",
    "sync",
]
