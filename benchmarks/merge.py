"""Merge benchmark: ours vs `cp -r` vs PEFT, side by side in one run.

Builds once (cached under $ADAPTERS_CACHE/bench or ~/.cache/adapterhub-local/bench, never
in the repo) a synthetic TinyLlama-shaped base (22 layers, hidden 2048, MLP 5632, GQA 32/4
heads, vocab 32000: ~1.1B parameters, bfloat16, 3 shards) and eight rank-16 all-linear
adapters (float32, as PEFT saves them on a bf16 base), then times in subprocesses:

  cp -r                         the floor: same bytes read and written (page cache only)
  cp -r + sync                  the same, made durable as ours is (fsync of every file)
  ours x1 (cold fingerprint)    base fingerprint hashed while streaming
  ours x1                       cached fingerprint reused (same files, sizes, mtimes)
  ours x8                       eight adapters stacked into one product per module
  ours x1 DoRA                  one rank-16 all-linear DoRA adapter (magnitude per output row)
  peft                          AutoModel load + PeftModel + merge_and_unload + save_pretrained

and prints wall time, peak RSS (the child's maxrss via /usr/bin/time) and the ratios the
issue sets as targets. Run: .venv/bin/python benchmarks/merge.py [--skip-peft] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ADAPTERS = str(Path(PY).parent / "adapters")

CFG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
    "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "tie_word_embeddings": False, "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    "attention_bias": False, "mlp_bias": False, "rope_theta": 10000.0,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bench_dir() -> Path:
    from adapterhub_local.paths import cache_dir

    d = cache_dir() / "bench"
    d.mkdir(parents=True, exist_ok=True)
    return d


def shapes() -> dict[str, tuple[int, ...]]:
    h, m, v, kv = CFG["hidden_size"], CFG["intermediate_size"], CFG["vocab_size"], 256
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(CFG["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h),
                    p + "mlp.down_proj.weight": (h, m), p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,)})
    return out


def build_base(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    if (path / "model.safetensors.index.json").is_file():
        return path
    tmp = path.with_name(path.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    names = sorted(shapes(), key=lambda n: (n.startswith("lm_head"), n))
    shard, size, shards, weight_map = {}, 0, [], {}
    limit = 1_000_000_000

    def flush():
        nonlocal shard, size
        if shard:
            shards.append(shard)
            shard, size = {}, 0

    print("building the synthetic 1.1B bf16 base (once) ...", file=sys.stderr)
    for n in names:
        shp = shapes()[n]
        if len(shp) == 2:
            t = (torch.randn(shp, generator=g) * 0.02).to(torch.bfloat16)
        else:
            t = torch.ones(shp, dtype=torch.bfloat16)
        if size + t.numel() * 2 > limit:
            flush()
        shard[n] = t
        size += t.numel() * 2
    flush()
    total = 0
    for i, s in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(s, tmp / fname, metadata={"format": "pt"})
        for n, t in s.items():
            weight_map[n] = fname
            total += t.numel() * 2
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(CFG, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    os.replace(tmp, path)
    return path


def build_adapters(base: Path, root: Path, n: int = 8, r: int = 16) -> list[Path]:
    import torch

    from adapterhub_local import provenance
    from adapterhub_local.fingerprint import fingerprint_model
    from adapterhub_local.lora import LoraModule
    from adapterhub_local.peft_format import LoraAdapter, lora_config, save_adapter

    paths = [root / f"adapter-{i}" for i in range(n)]
    if all((p / "adapter_model.safetensors").is_file() for p in paths):
        return paths
    fp = fingerprint_model(base, file_hashes=False).fingerprint
    sh = shapes()
    for i, p in enumerate(paths):
        if (p / "adapter_model.safetensors").is_file():
            continue
        g = torch.Generator().manual_seed(100 + i)
        mods = {}
        for name, shp in sh.items():
            mod = name[: -len(".weight")]
            if mod.rsplit(".", 1)[-1] not in TARGETS:
                continue
            out_f, in_f = shp
            mods[mod] = LoraModule(mod, torch.randn(r, in_f, generator=g) * 0.01,
                                   torch.randn(out_f, r, generator=g) * 0.01, scale=2.0, r=r, alpha=2.0 * r)
        cfg = lora_config(r=r, lora_alpha=2 * r, target_modules=TARGETS, base_model_name_or_path=str(base))
        save_adapter(LoraAdapter(cfg, mods), p, overwrite=True,
                     extra_files={provenance.NAME: provenance.dumps(provenance.build(
                         "adapter", "export", base_fingerprint=fp))})
    return paths


def build_dora_adapter(base: Path, root: Path, r: int = 16) -> Path:
    """adapter-0's factors plus a DoRA magnitude per output row (use_dora=true): the same rank,
    so its merge costs what the DoRA scaling adds (merge/dora.py)."""
    import torch

    from adapterhub_local.peft_format import load_adapter, save_adapter

    path = root / "adapter-dora"
    if (path / "adapter_model.safetensors").is_file():
        return path
    ad = load_adapter(root / "adapter-0")
    g = torch.Generator().manual_seed(7)
    for m in ad.modules.values():
        out_f, in_f = m.delta_shape
        # about ‖W row‖ for weights drawn N(0, 0.02²), perturbed
        m.magnitude = (0.02 * in_f ** 0.5 * (1 + 0.1 * torch.randn(out_f, generator=g))).numpy()
    ad.config = {**ad.config, "use_dora": True}
    save_adapter(ad, path, overwrite=True, extra_files={
        n: (root / "adapter-0" / n).read_bytes() for n in ("adapterhub.json",) if (root / "adapter-0" / n).is_file()})
    return path


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process."""
    full = ["/usr/bin/time", "-v"] + cmd
    t0 = time.perf_counter()
    proc = subprocess.run(full, env={**os.environ, **(env or {})}, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    engine.clear()
    if proc.stdout.lstrip().startswith("{"):  # our --json report: the merge itself, without start-up
        engine.append(json.loads(proc.stdout)["time_s"])
    # CPU seconds (user + sys): what a busy shared machine cannot inflate
    cpu.clear()
    cpu.extend(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", proc.stderr))
    return wall, (int(m.group(1)) / 1024 if m else float("nan"))


engine: list[float] = []  # time_s of the last run's report
cpu: list[float] = []  # user and system seconds of the last run


PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
m = PeftModel.from_pretrained(m, sys.argv[2]).merge_and_unload()
m.save_pretrained(sys.argv[3])
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--repeat", type=int, default=3,
                    help="repeat cp and our runs, keep the best wall time (the machine may be shared)")
    args = ap.parse_args()

    load0 = f"{os.getloadavg()[0]:.2f}"  # a shared machine: say how quiet it was
    bd = bench_dir()
    base = build_base(bd / "tinyllama-synth-bf16")
    adapters = build_adapters(base, bd)
    dora = build_dora_adapter(base, bd)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    ad_bytes = sum((a / "adapter_model.safetensors").stat().st_size for a in adapters)
    work = Path(tempfile.mkdtemp(prefix="merge-bench-", dir=bd))
    results: dict[str, tuple[float, float]] = {}
    engines: dict[str, float] = {}
    cpus: dict[str, float] = {}
    try:
        subprocess.run(["cat", *map(str, base.glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=True)

        def run(name, cmd, env=None, repeat=1):
            best = None
            for _ in range(repeat):
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                r = timed([c.replace("{out}", str(out)) for c in cmd], env)
                if engine:
                    engines[name] = min(engines.get(name, 1e9), engine[0])
                cpus[name] = min(cpus.get(name, 1e9), sum(cpu))
                best = r if best is None or r[0] < best[0] else (best[0], max(best[1], r[1]))
                shutil.rmtree(out, ignore_errors=True)
            results[name] = best
            print(f"  {name:28s} {best[0]:7.2f} s  {best[1]:8.0f} MB", file=sys.stderr)

        env = {"ADAPTERS_PROGRESS": "0"}
        run("cp -r", ["cp", "-r", str(base), "{out}"], repeat=args.repeat)
        # ours is durable (every file fsynced before the rename); this is cp's durable equivalent
        run("cp -r + sync", ["sh", "-c", f"cp -r '{base}' '{{out}}' && sync '{{out}}'/*"], repeat=args.repeat)
        cold_cache = work / "cold-cache"
        cold = None
        for _ in range(args.repeat):  # a fresh cache each time: the fingerprint is hashed while merging
            shutil.rmtree(cold_cache, ignore_errors=True)
            run("ours x1 (cold fingerprint)",
                [ADAPTERS, "merge", str(base), str(adapters[0]), "--out", "{out}", "--json"],
                {**env, "ADAPTERS_CACHE": str(cold_cache)})
            r = results["ours x1 (cold fingerprint)"]
            cold = r if cold is None or r[0] < cold[0] else (cold[0], max(cold[1], r[1]))
        results["ours x1 (cold fingerprint)"] = cold
        run("ours x1", [ADAPTERS, "merge", str(base), str(adapters[0]), "--out", "{out}", "--json"], env, args.repeat)
        run("ours x8", [ADAPTERS, "merge", str(base), *map(str, adapters), "--out", "{out}", "--json"],
            env, args.repeat)
        # DoRA against plain LoRA of the same rank, interleaved so a busy machine hits both alike
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.repeat):
            for name, ad in (("ours x1 (plain, again)", adapters[0]), ("ours x1 DoRA", dora)):
                run(name, [ADAPTERS, "merge", str(base), str(ad), "--out", "{out}", "--json"], env)
                if name in best and best[name][0] <= results[name][0]:
                    results[name] = best[name]
                best[name] = results[name]
        if not args.skip_peft:
            run("peft merge_and_unload", [PY, "-c", PEFT_SCRIPT, str(base), str(adapters[0]), "{out}"])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cp, one, cold, eight = (results[k] for k in ("cp -r", "ours x1", "ours x1 (cold fingerprint)", "ours x8"))
    print(f"\nbase: {size / 1e9:.2f} GB bf16 in {len(list(base.glob('*.safetensors')))} shards; "
          f"adapter: {ad_bytes / len(adapters) / 2**20:.0f} MB each ({len(adapters)} adapters)")
    print(f"{'run':28s} {'wall s':>8s} {'peak RSS MB':>12s} {'x cp -r':>8s} {'merge s':>8s} {'cpu s':>7s}")
    for k, (w, rss) in results.items():
        eng = f"{engines[k]:8.2f}" if k in engines else f"{'-':>8s}"
        print(f"{k:28s} {w:8.2f} {rss:12.0f} {w / cp[0]:8.2f} {eng} {cpus.get(k, float('nan')):7.2f}")
    print("(merge s: the report's time_s, i.e. without Python start-up and adapter loading;")
    print(" cpu s: user + system seconds of the whole process, fewest of the repeats)")
    from adapterhub_local.merge.cast import have_c_kernel

    print(f"fused C kernel: {'built' if have_c_kernel() else 'NOT built (numpy fallback)'}; "
          f"load average at start {load0}, at end {os.getloadavg()[0]:.2f}")
    print()
    lim1 = 330
    lim8 = 330 + ad_bytes / 2**20
    print(f"ours x1 / cp -r          {one[0] / cp[0]:6.2f}   (target <= 3)")
    if "cp -r + sync" in results:
        print(f"ours x1 / cp -r + sync   {one[0] / results['cp -r + sync'][0]:6.2f}   (both durable)")
    print(f"ours x1 cold / cp -r     {cold[0] / cp[0]:6.2f}   (target <= 4)")
    print(f"ours x8 / ours x1        {eight[0] / one[0]:6.2f}   (target <= 2)")
    print(f"ours x8 / ours x1, CPU   {cpus['ours x8'] / cpus['ours x1']:6.2f}   (for reference: no target)")
    dx = results["ours x1 DoRA"][0] / results["ours x1 (plain, again)"][0]
    print(f"ours DoRA / ours x1      {dx:6.2f}   (target <= 1.3; same rank, interleaved runs, best of each)")
    print(f"ours DoRA / ours x1, CPU {cpus['ours x1 DoRA'] / cpus['ours x1 (plain, again)']:6.2f}")
    print(f"ours x1 peak RSS         {one[1]:6.0f} MB (target <= {lim1} MB)")
    print(f"ours x8 peak RSS         {eight[1]:6.0f} MB (target <= {lim8:.0f} MB = 330 + adapters' bytes)")
    if "peft merge_and_unload" in results:
        peft = results["peft merge_and_unload"]
        print(f"peft / ours x1           {peft[0] / one[0]:6.2f}   (target >= 10)")
        print(f"peft peak RSS / ours x1  {peft[1] / one[1]:6.2f}")


if __name__ == "__main__":
    main()
