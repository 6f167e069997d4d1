"""One error hierarchy. The CLI prints ``str(err)`` as one line and exits 1.

Each error carries its fields so library callers can react without parsing text.
"""

from __future__ import annotations


class AdapterHubError(Exception):
    """Base of every error a user can cause; anything else is a bug."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class InvalidAdapter(AdapterHubError):
    """A folder or file that is not a usable LoRA adapter."""

    def __init__(self, path, problem: str, hint: str | None = None):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}", hint)


class UnsupportedAdapter(InvalidAdapter):
    """A valid PEFT adapter whose kind we refuse for additive math (DoRA, pickles, ...)."""


class InvalidModel(AdapterHubError):
    """A base-model folder we cannot read."""

    def __init__(self, path, problem: str, hint: str | None = None):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}", hint)


class AdapterNotFound(AdapterHubError):
    def __init__(self, ref: str, close: list[str] | None = None):
        self.ref = ref
        self.close = list(close or [])
        hint = f"did you mean: {', '.join(self.close)}?" if self.close else (
            "see `adapters list`, or give a path to a PEFT folder"
        )
        super().__init__(f"no adapter matches {ref!r}", hint)


class BaseMismatch(AdapterHubError):
    def __init__(self, expected: str, found: str, what: str = "base model"):
        self.expected = expected
        self.found = found
        super().__init__(
            f"{what} fingerprint mismatch: adapter expects {expected}, base has {found}",
            "use the base the adapter was trained on, or --force to merge anyway",
        )


class ShapeMismatch(AdapterHubError):
    def __init__(self, module: str, expected, found, where: str = ""):
        self.module = module
        self.expected = tuple(expected)
        self.found = tuple(found)
        prefix = f"{where}: " if where else ""
        super().__init__(
            f"{prefix}{module}: adapter delta has shape {list(self.found)} but the base weight is "
            f"{list(self.expected)}",
            "this adapter was trained for a different base model",
        )


class UnknownMergeMethod(AdapterHubError):
    def __init__(self, name: str, valid):
        self.name = name
        self.valid = sorted(valid)
        super().__init__(f"unknown merge method {name!r}", f"valid: {', '.join(self.valid)}")


class RegistryError(AdapterHubError):
    """Problems with the registry database or blob store."""


class UnsafeInput(AdapterHubError):
    """Something inside an input folder that we refuse to follow or open: a symlink
    (it could point anywhere, e.g. at ~/.ssh), a FIFO, socket or device file."""

    def __init__(self, path, problem: str, hint: str | None = None):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}", hint)


class PatternError(AdapterHubError):
    """A rank_pattern / alpha_pattern key we cannot match safely (invalid, or needing a
    backtracking feature such as lookaround or backreferences)."""

    def __init__(self, pattern, problem: str):
        self.pattern = pattern
        self.problem = problem
        shown = repr(pattern) if len(repr(pattern)) <= 80 else repr(pattern)[:70] + "…"
        super().__init__(f"pattern {shown}: {problem}")
