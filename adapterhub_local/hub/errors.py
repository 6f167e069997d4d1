"""Hub failures as one clear line each, and the translation from huggingface_hub's errors.

huggingface_hub raises multi-line errors (request ids, URLs, advice paragraphs) and
httpx transport errors; a user of `adapters push` wants to know which of a handful of
things went wrong and what to do next. ``hub_errors(step, repo_id, endpoint)`` wraps
each network step and re-raises a ``HubError`` subclass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..errors import AdapterHubError

TOKEN_HINT = "pass --token, set HF_TOKEN, or run `hf auth login`"
RERUN_HINT = "nothing was committed; run the same command again to finish: files already uploaded are not sent twice"


class HubError(AdapterHubError):
    """Anything that went wrong talking to a Hub."""


class InvalidRepoId(HubError):
    def __init__(self, repo_id: str, problem: str):
        self.repo_id = repo_id
        super().__init__(f"invalid repo id {repo_id!r}: {problem}",
                         "expected NAMESPACE/NAME, e.g. my-team/support-lora")


class NoToken(HubError):
    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        super().__init__(f"no Hugging Face token found for {endpoint}", TOKEN_HINT)


class AuthFailed(HubError):
    """The server rejected the token (401)."""

    def __init__(self, endpoint: str, detail: str = ""):
        self.endpoint = endpoint
        super().__init__(f"{endpoint} rejected the token (401{': ' + detail if detail else ''})",
                         f"check the token; {TOKEN_HINT}")


class PermissionDenied(HubError):
    """The token is valid but may not do this (403): another user's repo or namespace."""

    def __init__(self, repo_id: str, user: str | None, detail: str = ""):
        self.repo_id = repo_id
        self.user = user
        who = f"user {user!r}" if user else "this token"
        super().__init__(f"{who} may not write to {repo_id} (403{': ' + detail if detail else ''})",
                         "push to a namespace you own or belong to, or use a token with write access")


class RepoNotFound(HubError):
    def __init__(self, repo_id: str, endpoint: str, authenticated: bool):
        self.repo_id = repo_id
        hint = ("check the name; a private repo is only visible to its owner" if authenticated
                else f"check the name; if the repo is private, {TOKEN_HINT}")
        super().__init__(f"repo {repo_id} not found on {endpoint}", hint)


class RevisionNotFound(HubError):
    def __init__(self, repo_id: str, revision: str):
        self.repo_id = repo_id
        self.revision = revision
        super().__init__(f"revision {revision!r} not found in {repo_id}",
                         "give a branch, tag or commit id that exists")


class HubUnreachable(HubError):
    def __init__(self, endpoint: str, step: str, detail: str, resumable: bool):
        self.endpoint = endpoint
        super().__init__(f"cannot reach the Hub at {endpoint} during {step} ({detail})",
                         RERUN_HINT if resumable else "check HF_ENDPOINT and the network, then try again")


class HubServerError(HubError):
    def __init__(self, endpoint: str, step: str, status: int, detail: str, resumable: bool):
        self.endpoint = endpoint
        self.status = status
        super().__init__(f"the Hub at {endpoint} failed during {step} (HTTP {status}{': ' + detail if detail else ''})",
                         RERUN_HINT if resumable else "try again later")


class XetUnsupported(HubError):
    def __init__(self, endpoint: str, detail: str):
        self.endpoint = endpoint
        super().__init__(f"the Hub at {endpoint} does not speak the Xet transfer protocol ({detail})",
                         "set HF_HUB_DISABLE_XET=1 before running adapters, to upload through git-LFS instead")


class NotALoraRepo(HubError):
    def __init__(self, repo_id: str, revision: str, problem: str):
        self.repo_id = repo_id
        super().__init__(f"{repo_id}@{revision} is not a LoRA adapter repo: {problem}",
                         "`adapters pull` takes PEFT LoRA repos (adapter_config.json + adapter_model.safetensors)")


class OfflineMode(HubError):
    def __init__(self):
        super().__init__("HF_HUB_OFFLINE is set, so no request may reach the Hub",
                         "unset HF_HUB_OFFLINE (or use --dry-run to only build the folder)")


def _first_line(text: str) -> str:
    for line in str(text).splitlines():
        line = line.strip()
        if line:
            return line[:200]
    return ""


def _server_message(response) -> str:
    """The server's own message (X-Error-Message or the JSON "error"), not the client's essay."""
    if response is None:
        return ""
    msg = response.headers.get("X-Error-Message")
    if msg:
        return _first_line(msg)
    with contextlib.suppress(Exception):
        data = response.json()
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            return _first_line(data["error"])
    return ""


def translate(err: BaseException, *, step: str, repo_id: str, endpoint: str, user: str | None = None,
              authenticated: bool = True, resumable: bool = False, revision: str | None = None) -> HubError | None:
    """The HubError for a huggingface_hub / httpx exception, or None when it is not a Hub failure."""
    import httpx2
    from huggingface_hub import errors as hf

    # LFS upload failures arrive wrapped: RuntimeError("Error while uploading ...") from the cause
    seen = 0
    while isinstance(err, RuntimeError) and err.__cause__ is not None and seen < 5:
        err, seen = err.__cause__, seen + 1

    if isinstance(err, HubError):
        return err
    if isinstance(err, hf.OfflineModeIsEnabled):
        return OfflineMode()
    if isinstance(err, hf.LocalTokenNotFoundError):
        return NoToken(endpoint)
    if isinstance(err, hf.HFValidationError):
        return InvalidRepoId(repo_id, _first_line(str(err)))
    if isinstance(err, hf.RevisionNotFoundError):
        return RevisionNotFound(repo_id, revision or "main")
    if isinstance(err, hf.RepositoryNotFoundError):
        return RepoNotFound(repo_id, endpoint, authenticated)
    if isinstance(err, (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)):
        return HubUnreachable(endpoint, step, _first_line(str(err)) or type(err).__name__, resumable)
    if isinstance(err, hf.LocalEntryNotFoundError):
        # snapshot_download's wrapper for "could not reach the Hub and nothing is cached"
        cause = err.__cause__
        if cause is not None:
            inner = translate(cause, step=step, repo_id=repo_id, endpoint=endpoint, user=user,
                              authenticated=authenticated, resumable=resumable, revision=revision)
            if inner is not None:
                return inner
        return HubUnreachable(endpoint, step, "no answer", resumable)
    if isinstance(err, hf.HfHubHTTPError) and getattr(err, "response", None) is not None:
        status = err.response.status_code
        detail = _server_message(err.response)
        if status == 401:
            return AuthFailed(endpoint, detail)
        if status == 403:
            return PermissionDenied(repo_id, user, detail)
        if status == 404:
            return RepoNotFound(repo_id, endpoint, authenticated)
        if status >= 500:
            return HubServerError(endpoint, step, status, detail, resumable)
        return HubError(f"the Hub at {endpoint} refused {step} (HTTP {status}{': ' + detail if detail else ''})")
    if isinstance(err, ConnectionError) and "xet" in str(err).lower():
        # hf_xet (the Rust client) reports a Hub without Xet endpoints as a plain ConnectionError
        return XetUnsupported(endpoint, _first_line(str(err)))
    if isinstance(err, ConnectionError):
        return HubUnreachable(endpoint, step, _first_line(str(err)) or type(err).__name__, resumable)
    if isinstance(err, ValueError) and "Invalid metadata in README.md" in str(err):
        return HubError(f"the Hub refused the model card: {_first_line(str(err).split(chr(10), 1)[-1])}",
                        "fix the YAML header of your --card template")
    return None


@contextlib.contextmanager
def hub_errors(step: str, repo_id: str, endpoint: str, *, user: str | None = None,
               authenticated: bool = True, resumable: bool = False, revision: str | None = None) -> Iterator[None]:
    """Run one network step; a Hub failure becomes a one-line HubError."""
    try:
        yield
    except Exception as e:
        mapped = translate(e, step=step, repo_id=repo_id, endpoint=endpoint, user=user,
                           authenticated=authenticated, resumable=resumable, revision=revision)
        if mapped is None:
            raise
        raise mapped from e
