"""Hub repo ids (``NAMESPACE/NAME``): the rule, below every area.

``hub.common.validate_repo_id`` raises ``InvalidRepoId`` with :func:`repo_id_problem`'s
reason; the card builder (shared by train, merge and push) asks :func:`hub_id_or_none`
whether a recorded base name is a Hub id it may put in a card's ``base_model``.
"""

from __future__ import annotations

import re
from pathlib import Path

_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?$")


def repo_id_problem(repo_id) -> str | None:
    """Why ``repo_id`` is not NAMESPACE/NAME as the Hub accepts it, or None when it is."""
    if not isinstance(repo_id, str) or not repo_id:
        return "it is empty"
    if repo_id.count("/") != 1:
        return "it must have exactly one '/' between namespace and name"
    namespace, name = repo_id.split("/")
    for label, part in (("namespace", namespace), ("name", name)):
        if not part:
            return f"the {label} is empty"
        if not _PART.match(part):
            return (f"the {label} {part!r} may only use letters, digits, '-', '_' and '.', "
                    "may not start or end with '-' or '.', and is at most 96 characters")
        if "--" in part or ".." in part:
            return "'--' and '..' are not allowed"
    if name.endswith(".git"):
        return "the name may not end in .git"
    return None


def hub_id_or_none(name: str | None) -> str | None:
    """``name`` when it is a Hub repo id (not a local path), else None."""
    if not name or not isinstance(name, str):
        return None
    if name.startswith((".", "/", "~")) or "\\" in name or Path(name).exists():
        return None
    return None if repo_id_problem(name) else name
