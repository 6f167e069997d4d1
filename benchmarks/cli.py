"""Start-up of the everyday verbs: median wall time of the real `adapters` command, each run in
a fresh process, against `python -c pass` and `python -c "import numpy"` in the same run.

    .venv/bin/python benchmarks/cli.py [--runs 11] [--adapter-mb 50]

Goals (issue 11): list, show, register, inspect, verify, export, fingerprint, push --dry-run
and the serving `check` import no torch and each start in <= 0.3 s on an
empty registry (show, verify, export, push and check read a registry holding one tiny adapter);
registering a 50 MB adapter costs its hashing time plus <= 0.3 s. Inputs are written with
numpy (tests/tiny_np.py); nothing touches the network.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

ADAPTERS = str(Path(sys.executable).parent / "adapters")
LIMIT = 0.3  # seconds of start-up per verb


def cpu() -> tuple[str, str]:
    info = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    except (OSError, subprocess.CalledProcessError):
        pass
    model = info.get("Model name", platform.processor() or "?").strip()
    flags = info.get("Flags", "").split()
    keep = [f for f in flags if f in {"sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "sha_ni",
                                      "avx512_bf16", "amx_bf16"}]
    return f"{model}, {os.cpu_count()} CPUs", " ".join(keep) or "?"


def _cpu_children() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wall(cmd, env: dict, runs: int) -> tuple[list[float], list[float]]:
    """(wall, cpu) seconds of ``cmd`` in a new process, ``runs`` times after one warm-up (page
    cache, .pyc files). ``cmd`` is a list, or ``cmd(i)`` gives run i's list (its own output or
    registry). CPU = the child's user + system time: what a busy machine inflates least."""
    times, cpus = [], []
    for i in range(runs + 1):
        argv = cmd(i) if callable(cmd) else cmd
        c = _cpu_children()
        t = time.perf_counter()
        r = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        dt = time.perf_counter() - t
        if r.returncode:
            raise SystemExit(f"{' '.join(argv)} failed:\n{r.stderr[-2000:]}")
        if i:
            times.append(dt)
            cpus.append(_cpu_children() - c)
    return times, cpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--adapter-mb", type=float, default=50)
    args = ap.parse_args()

    from tiny_np import make_adapter, make_base

    from adapterhub_local.fingerprint import file_sha256

    tmp = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    base = make_base(tmp / "base")
    small = make_adapter(tmp / "small", base)
    big = make_adapter(tmp / "big", base, hidden=2048, r=16, size_mb=args.adapter_mb)
    # Installed packages run from cached bytecode; a PYTHONDONTWRITEBYTECODE=1 (set on some
    # sandboxes) would make every run compile every module again (~0.09 s), which no user pays.
    plain = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env = {**plain, "ADAPTERS_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "ADAPTERS_CACHE": str(tmp / "cache")}
    empty = {**env, "ADAPTERS_HOME": str(tmp / "empty")}
    one = {**env, "ADAPTERS_HOME": str(tmp / "one")}
    subprocess.run([ADAPTERS, "register", str(small), "--name", "a", "--base", str(base)], env=one, check=True,
                   capture_output=True)
    subprocess.run([ADAPTERS, "fingerprint", str(base)], env=one, check=True, capture_output=True)  # cached

    py = [sys.executable]
    n = args.runs
    load0 = os.getloadavg()[0]
    rows: list[tuple[str, tuple[list[float], list[float]]]] = [
        ("python -c pass", wall(py + ["-c", "pass"], env, n)),
        ("python -c 'import numpy'", wall(py + ["-c", "import numpy"], env, n)),
        ("adapters --help", wall([ADAPTERS, "--help"], env, n)),
        ("list (empty registry)", wall([ADAPTERS, "list"], empty, n)),
        ("register (tiny, new registry)",
         wall(lambda i: [ADAPTERS, "--registry", str(tmp / f"reg{i}"), "register", str(small), "--name", "a"], env, n)),
        ("show", wall([ADAPTERS, "show", "a"], one, n)),
        ("inspect", wall([ADAPTERS, "inspect", str(small)], env, n)),
        ("verify", wall([ADAPTERS, "verify", "a"], one, n)),
        ("export", wall(lambda i: [ADAPTERS, "export", "a", str(tmp / f"exp{i}")], one, n)),
        ("fingerprint (cached)", wall([ADAPTERS, "fingerprint", str(base)], one, n)),
        ("push --dry-run", wall(lambda i: [ADAPTERS, "push", "a", "me/tiny", "--dry-run", "--dry-run-dir",
                                           str(tmp / f"dry{i}")], one, n)),
        ("check --for vllm --base", wall([ADAPTERS, "check", "a", "--for", "vllm", "--base", str(base)], one, n)),
    ]
    big_files = sorted(p for p in big.iterdir() if p.is_file())
    big_mb = sum(p.stat().st_size for p in big_files) / 2**20
    big_runs = max(3, n // 2)
    reg_big, reg_big_cpu = wall(
        lambda i: [ADAPTERS, "--registry", str(tmp / f"big{i}"), "register", str(big), "--name", "big"],
        env, big_runs)
    cp, _ = wall(lambda i: ["cp", "-r", str(big), str(tmp / f"cp{i}")], env, big_runs)
    cp_sync, _ = wall(lambda i: ["sh", "-c", f"cp -r '{big}' '{tmp}/cps{i}' && sync '{tmp}/cps{i}'/*"], env, big_runs)
    hashing = []
    for _ in range(big_runs):
        t = time.perf_counter()
        for p in big_files:
            file_sha256(p)
        hashing.append(time.perf_counter() - t)
    load1 = os.getloadavg()[0]

    model, flags = cpu()
    med = statistics.median
    ref, ref_cpu = med(rows[0][1][0]), med(rows[0][1][1])
    numpy_ref = med(rows[1][1][0])
    print(f"CPU: {model}\nflags: {flags}\npython {platform.python_version()}, {n} runs per row "
          f"(median; {big_runs} for the {big_mb:.0f} MB register), load average {load0:.2f} at start, "
          f"{load1:.2f} at end\nbytecode cache: on (PYTHONDONTWRITEBYTECODE "
          f"{'removed from' if 'PYTHONDONTWRITEBYTECODE' in os.environ else 'not set in'} the children's env)\n")
    def line(name: str, ts: list[float], cs: list[float]) -> None:
        w, c = med(ts), med(cs)
        print(f"{name:32} {w:8.3f} {min(ts):7.3f} {w / ref:7.2f} {w - ref:8.3f} {w - numpy_ref:9.3f} "
              f"{c:7.3f} {c / ref_cpu:7.2f}")

    print(f"{'command':32} {'wall s':>8} {'min s':>7} {'/ pass':>7} {'- pass':>8} {'- numpy':>9} "
          f"{'cpu s':>7} {'/ pass':>7}")
    for name, (ts, cs) in rows:
        line(name, ts, cs)
    line(f"register ({big_mb:.0f} MB)", reg_big, reg_big_cpu)
    med_hash = med(hashing)
    print(f"{'  sha256 of its files':32} {med_hash:8.3f} {min(hashing):7.3f}   (in this process, same files)")
    print(f"{'  cp -r of its folder':32} {med(cp):8.3f} {min(cp):7.3f}   (disk floor)")
    print(f"{'  cp -r + sync':32} {med(cp_sync):8.3f} {min(cp_sync):7.3f}   (durable floor: register fsyncs its blobs)")
    print(f"\nregister ({big_mb:.0f} MB) - hashing: {med(reg_big) - med_hash:.3f} s wall, "
          f"{med(reg_big_cpu) - med_hash:.3f} s cpu (goal <= {LIMIT})")
    worst = max((med(ts), med(cs), name) for name, (ts, cs) in rows[3:])
    print(f"slowest verb: {worst[2]} {worst[0]:.3f} s wall, {worst[1]:.3f} s cpu (goal <= {LIMIT}; "
          f"{worst[0] / ref:.2f}x python -c pass)")


if __name__ == "__main__":
    main()
