"""`adapters demo`'s driver: a fresh work dir, the embedded (or given) base, the steps
in order (steps.py), the summary and the closing lines."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

import click

from .steps import run_steps
from .story import FULL, QUICK, DemoError, Story


@contextlib.contextmanager
def _in_workdir(workdir: Path, registry: Path):
    """cd into the work dir and point ADAPTERS_HOME at its registry, restoring both after."""
    old_cwd, old_home = os.getcwd(), os.environ.get("ADAPTERS_HOME")
    os.chdir(workdir)
    os.environ["ADAPTERS_HOME"] = str(registry)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        if old_home is None:
            os.environ.pop("ADAPTERS_HOME", None)
        else:
            os.environ["ADAPTERS_HOME"] = old_home


def prepare_workdir(workdir: str | Path | None) -> Path:
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix="adapters-demo-")).resolve()
    path = Path(workdir).expanduser().resolve()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise DemoError(f"{path}: already exists and is not empty",
                        "give a new or empty --workdir (the demo creates a fresh registry there)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_demo(workdir=None, base=None, quick: bool = False, rebuild_base: bool = False,
             out=click.echo, steps: int | None = None, cli: click.Group | None = None,
             app=None, table=None) -> dict:
    """Run the story; returns the summary (also written to WORKDIR/demo-summary.json).

    ``steps`` overrides the training steps per adapter (e.g. fewer on a big --base).
    ``cli``, ``app`` and ``table``: the `adapters` group the story runs, its context
    object factory and its table renderer (``adapters demo`` passes its own)."""
    from dataclasses import replace

    from ..eval.targets import is_model_dir
    from . import base as demo_base

    sizes = QUICK if quick else FULL
    if steps is not None:
        if steps < 1:
            raise DemoError(f"--steps must be at least 1, got {steps}")
        sizes = replace(sizes, steps=steps, eval_every=max(1, steps // 4))
    if base:
        base_dir = Path(base).expanduser().resolve()
        if not is_model_dir(base_dir):
            raise DemoError(f"{base_dir}: not a model folder", "need config.json and model.safetensors")
        if not any((base_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            raise DemoError(f"{base_dir}: has no tokenizer files",
                            "the demo trains on text: the base needs tokenizer.json (or tokenizer.model)")
    wd = prepare_workdir(workdir)
    out(f"adapterhub-local demo: everything below runs offline in {wd}")
    t0 = time.perf_counter()
    if base:
        base_info = {"name": base_dir.name, "user_supplied": True}
        out(f"# base: your model {base_dir}")
    else:
        spec = demo_base.QUICK if quick else demo_base.DEFAULT
        base_dir, base_info, cached = demo_base.ensure_base(
            spec, rebuild=rebuild_base, log=lambda m: out(f"# {m}"))
        if cached:
            out(f"# embedded demo base (cached): {base_dir}")
            out(f"# {base_info['parameters'] / 1e6:.2f}M parameters; held-out loss "
                f"{base_info['pretrained_loss']:.3f} vs {base_info['random_init_loss']:.3f} for a random "
                f"model (ln vocab = {base_info['ln_vocab']:.3f})")
    story = Story(workdir=wd, base=base_dir, sizes=sizes, out=out, cli=cli, app=app, table=table)
    story.summary.update({"workdir": str(wd), "base": str(base_dir), "base_info": base_info,
                          "quick": quick, "base_seconds": round(time.perf_counter() - t0, 1)})
    registry = wd / "registry"
    threads = contextlib.nullcontext() if base else demo_base.one_thread()
    with _in_workdir(wd, registry), threads:
        out(f"$ cd {wd}")
        out(f"$ export ADAPTERS_HOME=$PWD/registry BASE={base_dir}")
        run_steps(story)
    story.summary["seconds"] = round(time.perf_counter() - t0, 1)
    marks = story.summary["steps"]
    story_total = time.perf_counter() - story._t0
    for i, st in enumerate(marks):
        end = marks[i + 1]["t"] if i + 1 < len(marks) else story_total
        st["seconds"] = round(max(0.0, end - st["t"]), 1)
    from ..fsutil import atomic_write_json

    atomic_write_json(wd / "demo-summary.json", story.summary, fsync=False)
    _epilogue(story, registry)
    bad = story.summary["failed"] + [c["check"] for c in story.summary["checks"] if not c["ok"]]
    if bad:
        raise DemoError(f"demo finished with {len(bad)} problem(s): {'; '.join(bad)}")
    return story.summary


def _epilogue(story: Story, registry: Path) -> None:
    s, out = story.summary, story.out
    out("")
    out("=" * 78)
    out(f"done in {s['seconds']:.0f} s ({len(s['checks'])} checks, "
        f"{sum(c['ok'] for c in s['checks'])} passed; {len(s['skipped'])} step(s) skipped)")
    for msg in s["skipped"]:
        out(f"  {msg}")
    if s["steps"]:
        parts = [f"base {s['base_seconds']:.0f} s"] + [f"{st['n']}: {st['seconds']:.1f} s" for st in s["steps"]]
        out("time per step:   " + ", ".join(parts))
    out(f"work dir:        {story.workdir}")
    out(f"registry:        {registry}")
    for key, label in (("sweep_plot", "sweep plot:"), ("training_plot", "training plot:")):
        if s.get(key):
            out(f"{label:<16} {s[key]}")
    if s.get("dry_run_dir"):
        out(f"push dry run:    {s['dry_run_dir']}")
    out(f"summary:         {story.workdir / 'demo-summary.json'}")
    out("keep exploring:  export ADAPTERS_HOME=" + str(registry) + "; adapters list; "
        "adapters show arithmetic")
