"""`adapters demo`: the whole story, offline, each step printed as the command a user types.

This module is the story's vocabulary (sizes, the ``Story`` printer and runner); the
steps are in steps.py and the driver (work dir, base, summary) in runner.py.

Every step runs our own click commands in-process (so the output is the real
output), except the evaluation table and the sweep, which call the library
(``adapterhub_local.eval``; their numbers are also checked here) and print the
equivalent command and the table that command prints. The CLI hands the story
its click group, its context factory and its table renderer (``run_demo(cli=,
app=, table=)``): the demo never imports the CLI that runs it. A verb another area has not shipped yet is
skipped with a printed note instead of crashing the story. Numbers, checks
and timings also go to ``demo-summary.json`` in the work dir.
"""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from ..errors import AdapterHubError

BASE_VAR = "$BASE"
DOMAINS = ("arithmetic", "recipes", "code")


@dataclass(frozen=True)
class Sizes:
    n_train: int = 600
    n_eval: int = 80
    steps: int = 150
    eval_every: int = 25
    rank: int = 8
    alpha: float = 16.0
    lr: float = 3e-3
    batch_size: int = 16
    sweep_steps: int = 11
    svd_rank: int = 8


FULL = Sizes()
QUICK = Sizes(n_train=160, n_eval=24, steps=24, eval_every=8, rank=4, alpha=8.0, lr=5e-3,
              batch_size=8, sweep_steps=5, svd_rank=4)


class DemoError(AdapterHubError):
    """The demo could not run, or finished with failed steps or checks."""


@dataclass
class Story:
    workdir: Path
    base: Path
    sizes: Sizes
    out: object = click.echo
    cli: click.Group | None = None  # the `adapters` group whose commands the story runs
    app: object = None  # () -> the click context object those commands expect
    table: object = None  # (rows, headers) -> str: the CLI's table renderer
    summary: dict = field(default_factory=lambda: {"steps": [], "checks": [], "skipped": [], "failed": []})
    _step: int = 0
    _t0: float = field(default_factory=time.perf_counter)

    # --- printing --------------------------------------------------------------------------
    def heading(self, title: str) -> None:
        self._step += 1
        self.summary["steps"].append({"n": self._step, "title": title, "t": round(time.perf_counter() - self._t0, 1)})
        self.out("")
        self.out(f"=== {self._step}. {title} " + "=" * max(3, 70 - len(title)))

    def show_cmd(self, args: list[str]) -> None:
        shown = " ".join(a if a == BASE_VAR else shlex.quote(a) for a in args)
        self.out(f"$ adapters {shown}")

    def note(self, text: str) -> None:
        self.out(f"# {text}")

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.summary["checks"].append({"check": name, "ok": bool(ok), "detail": detail})
        self.out(f"check: {name}: {detail} -> {'OK' if ok else 'FAILED'}")
        return ok

    # --- running our own commands ---------------------------------------------------------
    def available(self, verb: str) -> bool:
        return self.cli is not None and verb in self.cli.commands

    def has_option(self, verb: str, flag: str) -> bool:
        cmd = self.cli.commands.get(verb) if self.cli is not None else None
        return cmd is not None and any(flag in p.opts for p in cmd.params)

    def run(self, args: list[str], step_needs: str | None = None) -> bool:
        """Print ``$ adapters ARGS`` and run it in-process; False when it failed or was skipped."""
        verb = step_needs or args[0]
        if not self.available(verb):
            msg = f"step {self._step} skipped: `adapters {verb}` not available yet"
            self.out(msg)
            self.summary["skipped"].append(msg)
            return False
        self.show_cmd(args)
        real = [str(self.base) if a == BASE_VAR else a for a in args]
        try:
            self.cli.main(args=real, prog_name="adapters", standalone_mode=False,
                          obj=self.app() if self.app else None)
        except click.exceptions.Exit as e:
            if e.exit_code:
                return self._failed(args, f"exit {e.exit_code}")
        except click.ClickException as e:
            return self._failed(args, e.format_message())
        except AdapterHubError as e:
            return self._failed(args, str(e))
        except Exception as e:  # a bug in one verb should not hide the rest of the story
            if _debug():
                raise
            return self._failed(args, f"internal error {type(e).__name__}: {e} "
                                "(run `adapters --debug demo` for the traceback)")
        return True

    def _failed(self, args: list[str], why: str) -> bool:
        msg = f"step {self._step} failed: adapters {args[0]}: {why}"
        self.out(f"error: {why}")
        self.summary["failed"].append(msg)
        return False


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    return bool(getattr(obj, "debug", False)) or os.environ.get("ADAPTERS_DEBUG") == "1"
