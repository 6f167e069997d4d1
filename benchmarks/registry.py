"""Registry performance: 100,000 versions, list/show/register latency, hashing vs sha256sum.

    .venv/bin/python benchmarks/registry.py [--versions 100000] [--hash-mb 512] [--keep DIR]

Goals (issue 3): `list --limit 50` with a metric filter and `show` each under 50 ms of
library time on 100,000 versions; registering a small adapter under 50 ms plus hashing;
hashing at >= 80% of sha256sum's throughput on the same file. Synthetic rows are written
straight into the schema (the registry's own migrations create it); the timed calls go
through the library exactly as the CLI makes them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def ms(f, repeat: int = 20) -> tuple[float, float]:
    """(median, best) milliseconds of f() over ``repeat`` runs after one warm-up."""
    f()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), min(times)


def fill(reg, n: int, names: int = 1000) -> None:
    rng = random.Random(0)
    conn = reg.conn
    now = "2026-01-01T00:00:00.000Z"
    cfg = json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]})
    with reg._write():
        conn.executemany("INSERT INTO adapters (id, name, last_version, created_at) VALUES (?, ?, ?, ?)",
                         [(i + 1, f"adapter-{i:04d}", n // names, now) for i in range(names)])
        blobs = [(f"{i:064x}", 1000 + i, now) for i in range(100)]
        conn.executemany("INSERT INTO blobs (sha256, size, created_at) VALUES (?, ?, ?)", blobs)
        rows, files, metrics, values = [], [], [], []
        for vid in range(1, n + 1):
            a = (vid - 1) % names
            ver = (vid - 1) // names + 1
            rows.append((vid, a + 1, f"adapter-{a:04d}", ver, f"{rng.getrandbits(256):064x}", "sha256:" + "ab" * 32,
                         8, 16.0, '["q_proj", "v_proj"]', 100_000, cfg, 2_000_000, now))
            files.append((vid, "adapter_config.json", blobs[vid % 100][0], 500))
            files.append((vid, "adapter_model.safetensors", blobs[(vid + 1) % 100][0], 2_000_000))
            loss = rng.uniform(0.5, 3.0)
            metrics.append((vid, "eval_loss", loss, None, None, now))
            values.append((vid, "eval_loss", loss))
            values.append((vid, "accuracy", rng.uniform(0.3, 0.95)))
        conn.executemany(
            "INSERT INTO versions (id, adapter_id, name, version, content_sha256, base_fingerprint, rank, alpha, "
            "targets, num_parameters, config, size, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        conn.executemany("INSERT INTO version_files VALUES (?, ?, ?, ?)", files)
        conn.executemany("INSERT INTO metrics (version_id, key, value, step, split, logged_at) "
                         "VALUES (?, ?, ?, ?, ?, ?)", metrics)
        conn.executemany("INSERT INTO metric_values VALUES (?, ?, ?)", values)
        conn.executemany("INSERT INTO aliases VALUES (?, 'prod', ?, ?)",
                         [(a + 1, a + 1 + names * 3, now) for a in range(names)])
        conn.executemany("INSERT INTO lineage (child_id, parent_ref, parent_id) VALUES (?, ?, ?)",
                         [(v, f"adapter-{(v - 2) % names:04d}@1", v - 1) for v in range(2, n + 1, 7)])
    # no ANALYZE: a real registry has no planner statistics either


def small_adapter(out: Path, seed: int) -> Path:
    import torch

    from adapterhub_local.peft_format import lora_config, parse_state_dict, save_adapter

    g = torch.Generator().manual_seed(seed)
    t = {}
    for i in range(2):
        for m in ("q_proj", "v_proj"):
            t[f"base_model.model.model.layers.{i}.self_attn.{m}.lora_A.weight"] = torch.randn(8, 256, generator=g)
            t[f"base_model.model.model.layers.{i}.self_attn.{m}.lora_B.weight"] = torch.randn(256, 8, generator=g)
    save_adapter(parse_state_dict(t, lora_config(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])), out)
    return out


def bench_hash(work: Path, mb: int) -> dict:
    from adapterhub_local.registry import sha256_file

    path = work / "hash.bin"
    with open(path, "wb") as fh:
        block = os.urandom(1024 * 1024)
        fh.writelines(block for _ in range(mb))
    ours, theirs = [], []
    for _ in range(3):  # interleaved, both from a warm page cache
        t = time.perf_counter()
        digest = sha256_file(path)[0]
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True).stdout
        theirs.append(time.perf_counter() - t)
        assert out.split()[0] == digest
    path.unlink()
    o, s = min(ours), min(theirs)
    return {"file_mb": mb, "ours_mb_s": mb / o, "sha256sum_mb_s": mb / s, "ratio": s / o}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", type=int, default=100_000)
    ap.add_argument("--hash-mb", type=int, default=512)
    ap.add_argument("--keep", type=Path, help="Build the registry here and keep it.")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from adapterhub_local.registry import open_registry

    work = Path(tempfile.mkdtemp(prefix="regbench-"))
    home = args.keep or work / "home"
    try:
        reg = open_registry(home)
        if not reg.list(limit=1):
            t = time.perf_counter()
            fill(reg, args.versions)
            print(f"filled {args.versions:,} versions in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        results = {}
        results["list --limit 50 --where eval_loss<1.2"] = ms(lambda: reg.list(where=["eval_loss<1.2"], limit=50))
        results["list --limit 50 --where 'eval_loss<1.2 and accuracy>0.9'"] = ms(
            lambda: reg.list(where=["eval_loss<1.2 and accuracy>0.9"], limit=50))
        results["list --limit 50 --where eval_loss<0.52 (1% match)"] = ms(
            lambda: reg.list(where=["eval_loss<0.52"], limit=50))
        results["list --limit 50 --where eval_loss<0 (no match)"] = ms(
            lambda: reg.list(where=["eval_loss<0"], limit=50))
        results["list --limit 50 --where eval_loss<1.2 --sort eval_loss"] = ms(
            lambda: reg.list(where=["eval_loss<1.2"], sort="eval_loss", limit=50))
        results["list --limit 50 --name 'adapter-09*' --latest"] = ms(
            lambda: reg.list(name="adapter-09*", latest_only=True, limit=50))
        results["list --limit 50 --alias prod"] = ms(lambda: reg.list(alias="prod", limit=50))

        def show():  # what `adapters show` asks the library for
            rec = reg.resolve("adapter-0500:prod")
            reg.base_model(rec.base_fingerprint)
            reg.merges_for(rec)
            reg.lineage(rec)

        results["show adapter-0500:prod"] = ms(show)
        results["resolve adapter-0777 (latest)"] = ms(lambda: reg.resolve("adapter-0777"))

        src = [small_adapter(work / f"small{i}", i) for i in range(11)]
        from adapterhub_local.registry import sha256_file

        from adapterhub_local.peft_format import load_adapter

        load_adapter(src[0])  # torch warm-up, not registry time
        reg.register(src[0], "bench-small")
        reg_times, hash_times = [], []
        for s in src[1:]:
            t = time.perf_counter()
            for f in s.iterdir():
                sha256_file(f)
            hash_times.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            reg.register(s, "bench-small")
            reg_times.append((time.perf_counter() - t) * 1000)
        size = sum(f.stat().st_size for f in src[1].iterdir())
        results[f"register {size / 1024:.0f} KB adapter (total)"] = (statistics.median(reg_times), min(reg_times))
        results["  of which hashing its files"] = (statistics.median(hash_times), min(hash_times))

        env = {**os.environ, "ADAPTERS_HOME": str(home)}
        exe = Path(sys.executable).with_name("adapters")

        def cli_list():
            subprocess.run([str(exe), "list", "--where", "eval_loss<1.2"], env=env, check=True,
                           capture_output=True)

        results["CLI process: adapters list --where eval_loss<1.2 (wall)"] = ms(cli_list, repeat=5)
        print(f"\nregistry with {args.versions:,} versions ({reg.db_path.stat().st_size / 1e6:.0f} MB db)\n")
        print(f"{'operation':64} {'median ms':>10} {'best ms':>9}")
        for k, (med, best) in results.items():
            print(f"{k:64} {med:10.2f} {best:9.2f}")
        h = bench_hash(work, args.hash_mb)
        print(f"\nhashing a {h['file_mb']} MB file: ours {h['ours_mb_s']:.0f} MB/s, sha256sum "
              f"{h['sha256sum_mb_s']:.0f} MB/s, ratio {h['ratio']:.2f} (goal >= 0.80)")
        reg.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
