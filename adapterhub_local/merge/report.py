"""What a merge reports: per-module norms and exactness figures, time, memory."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def stderr_notify(message: str) -> None:
    from ..terminal import safe_text

    print(safe_text(message, one_line=False), file=sys.stderr, flush=True)  # names come from adapter files


@dataclass
class MergeReport:
    operation: str
    method: str | None = None
    output: str | None = None
    inputs: list[dict] = field(default_factory=list)
    modules: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    fingerprint: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    recipe: dict = field(default_factory=dict)
    registered: dict | None = None
    time_s: float = 0.0
    peak_rss_mb: float = 0.0
    _t0: float = field(default_factory=time.perf_counter, repr=False)

    def warn(self, message: str, notify=stderr_notify) -> None:
        self.warnings.append(message)
        if notify:
            notify(f"warning: {message}")

    def finish(self) -> MergeReport:
        self.time_s = round(time.perf_counter() - self._t0, 4)
        self.peak_rss_mb = round(peak_rss_mb(), 1)
        return self

    def to_dict(self) -> dict:
        return {
            "operation": self.operation, "method": self.method, "output": self.output,
            "inputs": self.inputs, "summary": self.summary, "fingerprint": self.fingerprint,
            "warnings": self.warnings, "registered": self.registered, "recipe": self.recipe,
            "time_s": self.time_s, "peak_rss_mb": self.peak_rss_mb, "modules": self.modules,
        }


def rel_error(exact_sq: float, err_sq: float) -> float:
    """‖exact − approx‖ / ‖exact‖ from squared norms (0 when exact is 0)."""
    if exact_sq <= 0:
        return 0.0 if err_sq <= 0 else float("inf")
    return (max(err_sq, 0.0) / exact_sq) ** 0.5
