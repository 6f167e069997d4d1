"""Re-run the examples of docs/team.md ("A registry for a team") and print the transcript.

From the repository root, with the project's venv (torch, transformers and PEFT build the
tiny models; nothing is downloaded):

    .venv/bin/python docs/examples/team_walkthrough.py                  # every part
    .venv/bin/python docs/examples/team_walkthrough.py --part sync      # one part
    .venv/bin/python docs/examples/team_walkthrough.py --workdir /tmp/teamdemo

Each part starts the project's test Hub (tests/hubserver.py) on 127.0.0.1 with a fresh,
empty namespace `acme` (users ana and ben, both members), runs the `adapters` commands of
that part of the page with two registry homes standing in for two machines, prints every
command with its output (stdout and stderr, in the order they were written), and stops the
server. `[laptop]` is ana (ADAPTERS_HOME=<workdir>/<part>/laptop), `[gpu-node]` is ben
(ADAPTERS_HOME=<workdir>/<part>/gpu-node). Lines starting with `#` are setup the page
describes in prose; their output is not printed. The models are a tiny Llama (`llama/`)
and two PEFT LoRA adapters on it (`support-v1/`, `support-v2/`), built in the work
directory (a new temporary directory unless --workdir names one that does not exist yet).

Commit ids, ports, dates and the work directory differ from run to run; everything else
the page shows is what this prints. A command that exits otherwise than the page says
stops the script with an error.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
ADAPTERS = Path(sys.executable).parent / "adapters"
USERS = {"tok-ana": "ana", "tok-ben": "ben"}
MACHINES = {"laptop": "tok-ana", "gpu-node": "tok-ben"}
ORG = "acme"
REPO = f"{ORG}/support-lora"


def build_models(work: Path) -> None:
    """A tiny Llama and two LoRA adapters PEFT itself writes (q_proj, v_proj; rank 4)."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # transformers and PEFT must not look anything up
    from tiny import make_llama, make_peft_adapter

    base = make_llama(work / "llama")
    make_peft_adapter(base, work / "support-v1", seed=3)
    make_peft_adapter(base, work / "support-v2", seed=4)


class Session:
    """One test Hub and two registry homes; ``run`` prints a command and its output."""

    def __init__(self, work: Path, part: str, hub_url: str, out: Callable[[str], None]):
        self.work, self.part, self.url, self.out = work, part, hub_url, out

    def env(self, machine: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "ADAPTERS_"))}
        env.update(HF_ENDPOINT=self.url, HF_TOKEN=MACHINES[machine], HF_HUB_DISABLE_XET="1",
                   HF_HOME=str(self.work / self.part / f"hf-{machine}"),
                   ADAPTERS_HOME=str(self.work / self.part / machine),
                   ADAPTERS_CACHE=str(self.work / self.part / f"cache-{machine}"),
                   ADAPTERS_PROGRESS="0", PYTHONUNBUFFERED="1", COLUMNS="80")
        return env

    def run(self, machine: str, *args: str, fails: bool = False, show: bool = True) -> str:
        proc = subprocess.run([str(ADAPTERS), *args], cwd=self.work, env=self.env(machine), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
        line = f"[{machine}] adapters {shlex.join(args)}"
        if show:
            self.out(f"$ {line}\n{proc.stdout.rstrip()}\n")
        else:
            self.out(f"# {line}")
        if (proc.returncode != 0) != fails:
            raise SystemExit(f"`{line}` exited {proc.returncode}, expected {'an error' if fails else '0'}:\n"
                             f"{proc.stdout}")
        return proc.stdout


def walkthrough(s: Session) -> None:
    """## Two machines, one namespace."""
    s.run("laptop", "register", "support-v1", "--name", "support", "--base", "llama", "--metric", "eval_loss=1.31")
    s.run("laptop", "push", "support", REPO)
    s.run("laptop", "register", "support-v2", "--name", "support", "--base", "llama", "--metric", "eval_loss=1.18")
    s.run("laptop", "push", "support@2", REPO)
    s.run("laptop", "push", "support@2", REPO)

    s.run("laptop", "remote", "alias", REPO, "prod", "v1")
    s.run("gpu-node", "remote", "alias", REPO, "v3", "v1", fails=True)

    s.run("gpu-node", "remote", "list", ORG)
    s.run("gpu-node", "remote", "list", ORG, "--where", "eval_loss<1.2", "--json")

    s.run("gpu-node", "pull", f"{REPO}:prod")
    s.run("gpu-node", "pull", f"{REPO}@v1")
    s.run("gpu-node", "show", "support-lora")

    s.run("gpu-node", "log-metric", "support-lora@1", "win_rate=0.62", "--push")
    s.run("laptop", "remote", "list", ORG, "--sort", "eval_loss")

    s.run("laptop", "remote", "alias", REPO, "prod", "v2")
    s.run("gpu-node", "sync", ORG, "--weights")
    s.run("gpu-node", "list")
    s.run("gpu-node", "list", "--sort", "eval_loss", "--claims")


def sync(s: Session) -> None:
    """## `sync`: the whole namespace, metadata first."""
    s.run("laptop", "register", "support-v1", "--name", "support", "--base", "llama", "--metric", "eval_loss=1.31",
          show=False)
    s.run("laptop", "register", "support-v2", "--name", "support", "--base", "llama", "--metric", "eval_loss=1.18",
          show=False)
    s.run("laptop", "push", "support@1", REPO, show=False)
    s.run("laptop", "remote", "alias", REPO, "prod", "v1", show=False)
    s.run("laptop", "log-metric", "support@1", "win_rate=0.62", "--push", show=False)
    s.run("laptop", "push", "support@2", REPO, show=False)
    s.out("")

    s.run("gpu-node", "sync", ORG)
    s.run("gpu-node", "list")
    s.run("gpu-node", "show", "support-lora:prod")

    s.run("gpu-node", "export", "support-lora:prod", "./prod", fails=True)
    s.run("gpu-node", "merge", "llama", "support-lora@2", "--out", "./merged", fails=True)
    s.run("gpu-node", "verify")
    s.run("gpu-node", "sync", ORG)

    s.run("gpu-node", "pull", f"{REPO}@v1")
    s.run("gpu-node", "export", "support-lora:prod", "./prod")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        same = filecmp.cmp(s.work / "prod" / name, s.work / "support-v1" / name, shallow=False)
        s.out(f"$ cmp prod/{name} support-v1/{name}" + ("" if same else "\n(differ)") + "\n")
        if not same:
            raise SystemExit(f"the exported {name} is not the bytes the laptop pushed")

    s.run("gpu-node", "alias", "support-lora@1", "stable")
    s.run("laptop", "remote", "alias", REPO, "prod", "v2")
    s.run("laptop", "remote", "alias", REPO, "stable", "v2")
    s.run("gpu-node", "sync", ORG, "--weights")
    s.run("gpu-node", "list")
    s.run("gpu-node", "sync", "--help")


def costs(s: Session) -> None:
    """## What a `remote list` costs: three repos, two versions each."""
    for i, name in enumerate(["support", "summarize", "triage"]):
        s.run("laptop", "register", "support-v1", "--name", name, "--base", "llama",
              "--metric", f"eval_loss={1.31 - i / 10:.2f}", show=False)
        s.run("laptop", "register", "support-v2", "--name", name, "--base", "llama",
              "--metric", f"eval_loss={1.18 - i / 10:.2f}", show=False)
        s.run("laptop", "push", f"{name}@1", f"{ORG}/{name}-lora", show=False)
        s.run("laptop", "push", f"{name}@2", f"{ORG}/{name}-lora", show=False)
    s.run("laptop", "remote", "alias", REPO, "prod", "v1", show=False)
    s.out("")
    s.run("gpu-node", "remote", "list", ORG, "--calls")
    s.run("gpu-node", "remote", "list", ORG, "--calls")
    s.run("laptop", "remote", "alias", REPO, "prod", "v2")
    s.run("gpu-node", "remote", "list", ORG, "--calls")
    s.run("gpu-node", "remote", "list", ORG, "--refresh", "--calls")


PARTS = {"walkthrough": walkthrough, "sync": sync, "costs": costs}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=[*PARTS, "all"], default="all")
    ap.add_argument("--workdir", type=Path, help="a directory that does not exist yet (default: a new temp dir)")
    args = ap.parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True)  # refuses one that exists: every run starts empty
        work = args.workdir.resolve()
    else:
        work = Path(tempfile.mkdtemp(prefix="team-walkthrough-"))
    if not ADAPTERS.is_file():
        raise SystemExit(f"no {ADAPTERS}: run this with the venv's python (.venv/bin/python)")

    build_models(work)
    from hubserver import HubServer  # tests/hubserver.py: stdlib only, listens on 127.0.0.1

    print(f"# work directory {work}", flush=True)
    for name, part in PARTS.items():
        if args.part not in (name, "all"):
            continue
        with HubServer(users=USERS, orgs={user: [ORG] for user in USERS.values()}) as hub:
            print(f"\n## {name} (test Hub at {hub.url})\n", flush=True)
            part(Session(work, name, hub.url, lambda text: print(text, flush=True)))


if __name__ == "__main__":
    main()
