"""Hub transport overhead: `adapters push` / `adapters pull` vs plain huggingface_hub, one run.

    .venv/bin/python benchmarks/hub.py [--mb 256] [--keep DIR]

Both sides talk to the same loopback test server (tests/hubserver.py, LFS basic transfer,
Xet off), so the ratio is our overhead: staging (links, no copies), the fingerprint and
file hashes, the card and adapterhub.json, whoami/repo_info, registry bookkeeping.
Goal: push of a merged model within 1.5x of a bare `upload_folder` of the same folder;
pull of an adapter within 2x of a bare `snapshot_download` plus registration.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def timed(f):
    t = time.perf_counter()
    out = f()
    return time.perf_counter() - t, out


def make_model(out: Path, mb: int) -> Path:
    """A model folder of ~mb MiB in 2 shards (random float32), config.json and a recipe."""
    import json

    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    n = mb * 1024 * 1024 // 4 // 2
    side = int(n ** 0.5)
    weight_map = {}
    for i in range(2):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        t = {f"layers.{i}.weight": torch.randn(side, side, generator=g)}
        save_file(t, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(t, name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (out / "recipe.yaml").write_text("operation: merge\nmethod: linear\ninputs: []\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=256, help="size of the merged model (MiB)")
    ap.add_argument("--keep", metavar="DIR", help="work here and keep it (default: a temp dir, removed)")
    args = ap.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-hub-"))
    work.mkdir(parents=True, exist_ok=True)

    from hubserver import HubServer

    server = HubServer(users={"tok": "bench"}, data_dir=work / "server").start()
    # huggingface_hub reads these when imported: set them first
    os.environ.update(HF_ENDPOINT=server.url, HF_HUB_DISABLE_XET="1", HF_TOKEN="tok", HF_HOME=str(work / "hf"),
                      ADAPTERS_HOME=str(work / "home"), ADAPTERS_CACHE=str(work / "cache"),
                      ADAPTERS_PROGRESS="0", HF_HUB_DISABLE_PROGRESS_BARS="1")
    os.environ.pop("HF_HUB_OFFLINE", None)
    from huggingface_hub import HfApi, snapshot_download
    from tiny import make_llama, make_peft_adapter

    from adapterhub_local.hub import pull, push

    try:
        model = make_model(work / "merged", args.mb)
        size = sum(p.stat().st_size for p in model.iterdir()) / 2**20
        api = HfApi(endpoint=server.url, token="tok")

        def bare_push():
            api.create_repo("bench/bare", exist_ok=True)
            return api.upload_folder(repo_id="bench/bare", folder_path=model, commit_message="bare")

        t_bare, _ = timed(bare_push)
        t_ours, _ = timed(lambda: push(str(model), "bench/ours"))
        print(f"push {size:.0f} MiB merged model: upload_folder {t_bare:.2f} s, adapters push {t_ours:.2f} s, "
              f"ratio {t_ours / t_bare:.2f} (goal <= 1.5)")

        base = make_llama(work / "llama", hidden=64)
        adapter = make_peft_adapter(base, work / "adapter", r=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                    "o_proj"])
        push(str(adapter), "bench/adapter")
        t_bare, _ = timed(lambda: snapshot_download("bench/adapter", local_dir=work / "dl", endpoint=server.url))
        t_ours, _ = timed(lambda: pull("bench/adapter", name="bench"))
        print(f"pull adapter: snapshot_download {t_bare:.2f} s, adapters pull (download, verify, register) "
              f"{t_ours:.2f} s, ratio {t_ours / t_bare:.2f} (goal <= 2)")
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
