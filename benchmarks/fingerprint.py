"""Fingerprint throughput against `sha256sum` on the same files, in one run.

Builds (once, cached under the adapterhub-local cache dir) a synthetic bf16 model of
~1 GB in two shards, warms the page cache, then times:
  sha256sum of the files, ours with file hashes (what `adapters fingerprint` does),
  ours with tensor digests only (what a streaming merge needs).
Run: .venv/bin/python benchmarks/fingerprint.py [--gb 1.0]
"""

from __future__ import annotations

import argparse
import subprocess
import time

import torch

from adapterhub_local.fingerprint import fingerprint_model, model_files
from adapterhub_local.paths import cache_dir
from adapterhub_local.safetensors_io import save_safetensors


def build(gb: float):
    out = cache_dir() / "bench" / f"fp-model-{gb:g}gb"
    if (out / "model-00002-of-00002.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    per_shard = int(gb * 2**30 / 2 / 2)  # bf16 elements per shard
    n_tensors = 64
    g = torch.Generator().manual_seed(0)
    for s in range(2):
        tensors = {f"layers.{s}.{i}.weight": torch.randn(per_shard // n_tensors, generator=g).bfloat16()
                   for i in range(n_tensors)}
        save_safetensors(tensors, out / f"model-0000{s + 1}-of-00002.safetensors", fsync=False)
    return out


def best_of(fn, n=3):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    args = ap.parse_args()
    model = build(args.gb)
    files = [str(f) for f in model_files(model)]
    size = sum(__import__("os").path.getsize(f) for f in files)
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)  # warm the cache
    t_sum = best_of(lambda: subprocess.run(["sha256sum", *files], capture_output=True, check=True))
    t_par = best_of(lambda: [p.wait() for p in [subprocess.Popen(["sha256sum", f], stdout=subprocess.DEVNULL)
                                               for f in files]])
    t_ours = best_of(lambda: fingerprint_model(model, use_cache=False))
    t_tensor = best_of(lambda: fingerprint_model(model, use_cache=False, file_hashes=False))
    t_cached = best_of(lambda: fingerprint_model(model))
    gbs = size / 2**30
    print(f"model: {gbs:.2f} GiB in {len(files)} files")
    print(f"{'what':<42}{'seconds':>9}{'GiB/s':>8}{'vs sha256sum':>14}")
    for name, t in [("sha256sum (one process, files in turn)", t_sum),
                    ("sha256sum (one process per file)", t_par),
                    ("ours: fingerprint + file sha256", t_ours),
                    ("ours: fingerprint only (tensor digests)", t_tensor),
                    ("ours: cached (same path, size, mtime)", t_cached)]:
        print(f"{name:<42}{t:>9.3f}{gbs / t:>8.2f}{t_sum / t:>13.2f}x")


if __name__ == "__main__":
    main()
