"""Many writers at once, and writers killed with SIGKILL mid-register.

Workers are subprocesses running a small snippet against the library; the adapters
are built here beforehand with our own writer (no transformers import in the workers).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from adapterhub_local.registry import open_registry
from test_registry import make_adapter

# A zygote: imports torch once, then forks one worker per job (a fresh interpreter per
# worker would spend ~20 s of the test importing torch 8 times on 2 busy cores).
# Workers open their own registry connection after the fork.
WORKER = textwrap.dedent(r"""
    import json, os, sys, time, traceback
    from pathlib import Path
    import torch  # noqa: F401  (imported once here, before any fork; peft_format no longer does)
    import adapterhub_local.peft_format  # noqa: F401
    from adapterhub_local.registry import open_registry

    home, jobs, parallel = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "parallel"

    def work(job):
        go = Path(job["go"])
        while not go.exists():
            time.sleep(0.002)
        reg = open_registry(home)
        for i, folder in enumerate(job["folders"]):
            rec = reg.register(folder, f"team{i % job['names']}", metrics={"eval_loss": i / 10})
            os.write(1, f"{rec.ref} {rec.is_new}\n".encode())  # one write per line: atomic on a pipe

    pids, failed = [], 0
    for job in jobs:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                work(job)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            os._exit(code)
        os.write(1, f"child {pid}\n".encode())
        if parallel:
            pids.append(pid)
        else:
            _, status = os.waitpid(pid, 0)
            os.write(1, f"exit {pid} {status}\n".encode())
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        failed += status != 0
    os.write(1, f"done {failed}\n".encode())
    sys.exit(1 if failed else 0)
""")


def _zygote(home: Path, jobs: list[dict], parallel: bool) -> subprocess.Popen:
    env = {**os.environ, "ADAPTERS_PROGRESS": "0"}
    jobs = [{**j, "go": str(j["go"]), "folders": [str(f) for f in j["folders"]]} for j in jobs]
    return subprocess.Popen([sys.executable, "-c", WORKER, str(home), json.dumps(jobs),
                             "parallel" if parallel else "serial"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _assert_gap_free(reg) -> dict[str, list[int]]:
    versions: dict[str, list[int]] = {}
    for name, version in reg.conn.execute("SELECT name, version FROM versions ORDER BY name, version"):
        versions.setdefault(name, []).append(version)
    for name, nums in versions.items():
        assert nums == list(range(1, len(nums) + 1)), f"{name}: {nums}"
    return versions


def test_eight_processes_register_200_adapters_at_once(tmp_path):
    procs_n, per = 8, 25
    src = tmp_path / "src"
    folders = [[make_adapter(src / f"p{p}-{i}", seed=1000 * p + i, r=2, layers=1) for i in range(per)]
               for p in range(procs_n)]
    home, go = tmp_path / "home", tmp_path / "go"  # a fresh registry: the workers also race to create it
    proc = _zygote(home, [{"go": go, "names": 4, "folders": folders[p]} for p in range(procs_n)], parallel=True)
    try:
        for _ in range(procs_n):
            assert proc.stdout.readline().startswith("child "), proc.stderr.read()
        go.touch()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[-1] == "done 0"
    assert [ln.split()[-1] for ln in lines[:-1]] == ["True"] * (procs_n * per), [
        ln for ln in lines if not ln.endswith("True")]
    reg = open_registry(home)
    versions = _assert_gap_free(reg)
    assert sum(len(v) for v in versions.values()) == procs_n * per
    assert sorted(versions) == ["team0", "team1", "team2", "team3"]
    # every adapter landed exactly once, with its own bytes
    contents = {r[0] for r in reg.conn.execute("SELECT content_sha256 FROM versions")}
    assert len(contents) == procs_n * per
    report = reg.verify()
    assert report["ok"] and report["orphans"] == [] and report["versions"] == procs_n * per


def test_sigkill_during_register_leaves_registry_consistent(tmp_path):
    rng = random.Random(int(os.environ.get("REGISTRY_KILL_SEED", "20261130")))
    src = tmp_path / "src"
    # ~1 MB adapters, so a kill often lands while a blob is being written; new ones each round
    per, rounds = 12, 5
    home = tmp_path / "home"
    open_registry(home).close()
    jobs = [{"go": tmp_path / f"go{r}", "names": 2,
             "folders": [make_adapter(src / f"r{r}-{i}", seed=100 * r + i, r=128, hidden=128, layers=4,
                                      targets=("q_proj", "o_proj")) for i in range(per)]}
            for r in range(rounds)]
    proc = _zygote(home, jobs, parallel=False)
    kills = 0
    try:
        for job in jobs:
            line = proc.stdout.readline()
            assert line.startswith("child "), proc.stderr.read()
            pid = int(line.split()[1])
            job["go"].touch()
            # let it finish a random number of registrations, then kill it at a random moment
            # (at least half the adapters still to go, so a fast disk cannot finish them all first)
            for _ in range(rng.randrange(0, per // 2)):
                proc.stdout.readline()
            time.sleep(rng.uniform(0.0, 0.01))
            with contextlib.suppress(ProcessLookupError):  # it may still have finished: a round without a kill
                os.kill(pid, signal.SIGKILL)
            while not (line := proc.stdout.readline()).startswith("exit "):
                assert line, proc.stderr.read()
            status = int(line.split()[2])
            kills += os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            reg = open_registry(home)
            report = reg.verify()
            assert report["ok"], report["problems"]
            # no row points at a missing blob; every version reads back as a PEFT folder
            for rec in reg.list(limit=None):
                assert reg.adapter_path(rec).is_dir()
            _assert_gap_free(reg)
            reg.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert kills >= 3  # most rounds really were killed mid-run
    reg = open_registry(home)
    reg.gc()
    report = reg.verify()
    assert report["ok"] and report["orphans"] == []
    assert not any(reg.blobs.tmp_dir.iterdir()) if reg.blobs.tmp_dir.exists() else True


def test_empty_db_file_is_a_new_registry(tmp_path):
    home = tmp_path / "h"
    home.mkdir()
    (home / "registry.db").write_bytes(b"")
    reg = open_registry(home)
    assert reg.list() == [] and reg.verify()["ok"]


@pytest.mark.parametrize("bad", [b"SQLite format 3\x00" + b"\x00" * 84, b"SQLite format 3\x00" + b"\x07" * 2000])
def test_damaged_db_is_a_clear_error(tmp_path, bad):
    from adapterhub_local.errors import RegistryError

    home = tmp_path / "h"
    home.mkdir()
    (home / "registry.db").write_bytes(bad)
    with pytest.raises(RegistryError, match="cannot open the registry database"):
        open_registry(home)
    assert (home / "registry.db").read_bytes() == bad
