"""The trainer at two commits, on the benchmark model: same losses bit for bit, and speed.

For refactors of trainer/: a change that should not touch the math must give the same
per-step losses, eval losses and adapter bytes as before, at the same speed. Exports
both source trees (``git archive``, trainer/ and registry/ mapped into the package as
an install does), then runs ``train()`` from each in a fresh subprocess, interleaved
over --rounds (a busy minute slows any run; each side's best round counts). Uses the
model and data of benchmarks/train.py (built on first use under its cache directory).

Run: .venv/bin/python benchmarks/train_compare.py [--old main] [--new WORKTREE] [--steps 6] [--rounds 3]
(--new defaults to the working tree as it is, uncommitted changes included).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "benchmarks" / "train.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def export(rev: str | None, into: Path) -> Path:
    """A source tree importable with PYTHONPATH: git ``rev``, or the working tree (None)."""
    into.mkdir(parents=True)
    if rev is None:
        for name in ("adapterhub_local", "trainer", "registry"):
            shutil.copytree(REPO / name, into / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        tar = subprocess.run(["git", "-C", str(REPO), "archive", rev, "adapterhub_local", "trainer",
                              "registry"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=tar, check=True)
    for sub in ("trainer", "registry"):
        (into / sub).rename(into / "adapterhub_local" / sub)
    return into


def child(a: dict) -> None:
    import time

    import torch
    from adapterhub_local.trainer import TrainConfig, train

    torch.set_num_threads(a["threads"])
    cfg = TrainConfig(base=a["base"], data=a["data"], out=a["out"], register=False, overwrite=True,
                      eval=a["eval"], eval_every=a["eval_every"], rank=16, alpha=32, dropout=0.05,
                      targets="q_proj,v_proj", lr=2e-4, warmup=0, schedule="cosine",
                      max_steps=a["steps"], batch_size=a["batch"], grad_accum=2,
                      seq_len=a["seq_len"], seed=0, threads=a["threads"])
    t = time.perf_counter()
    r = train(cfg)
    wall = time.perf_counter() - t
    print(json.dumps({"losses": [h["loss"] for h in r.history if "loss" in h],
                      "evals": [h["eval_loss"] for h in r.history if "eval_loss" in h],
                      "tokens_per_s": r.metrics["tokens_per_s"], "wall": wall,
                      "weights": (Path(a["out"]) / "adapter_model.safetensors").read_bytes().hex()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default="main", help="git revision (default: main)")
    ap.add_argument("--new", default=None, help="git revision (default: the working tree)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    b = _bench()
    root = b.bench_dir()
    root.mkdir(parents=True, exist_ok=True)
    base, data = root / "base", root / "data-256-512"
    if not base.exists():
        b.build_base(base)
    if not (data / "uniform.jsonl").exists():
        data.mkdir(exist_ok=True)
        b.build_data(data, 256, 512, 256)
    a = {"base": str(base), "data": str(data / "uniform.jsonl"), "eval": str(data / "eval.jsonl"),
         "eval_every": 3, "steps": args.steps, "batch": 2, "seq_len": 256, "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="train-compare-") as tmp:
        trees = {"old": export(args.old, Path(tmp) / "old"), "new": export(args.new, Path(tmp) / "new")}
        runs: dict[str, list[dict]] = {"old": [], "new": []}
        for rnd in range(args.rounds):
            for kind, tree in trees.items():
                env = {**os.environ, "PYTHONPATH": str(tree), "ADAPTERS_PROGRESS": "0"}
                p = subprocess.run([sys.executable, __file__, "--child",
                                    json.dumps({**a, "out": f"{tmp}/out-{kind}"})],
                                   env=env, capture_output=True, text=True, cwd=tmp)
                if p.returncode:
                    sys.exit(p.stderr[-3000:])
                res = json.loads(p.stdout.strip().splitlines()[-1])
                runs[kind].append(res)
                print(f"round {rnd} {kind}: {res['tokens_per_s']:.0f} tokens/s, {res['wall']:.1f} s",
                      flush=True)
    first = runs["old"][0]
    same = all(r["losses"] == first["losses"] and r["evals"] == first["evals"]
               and r["weights"] == first["weights"] for r in runs["old"] + runs["new"])
    best = {k: max(r["tokens_per_s"] for r in v) for k, v in runs.items()}
    print(f"losses: {first['losses']}")
    print(f"eval losses: {first['evals']}")
    print(f"same losses, eval losses and adapter bytes in all {2 * args.rounds} runs: {same}")
    print(f"best tokens/s: old {best['old']:.0f}, new {best['new']:.0f}, "
          f"new/old {best['new'] / best['old']:.3f}")


if __name__ == "__main__":
    main()
