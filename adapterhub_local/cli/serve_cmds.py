"""`adapters check | convert`: thin commands over adapterhub_local.serve."""

from __future__ import annotations

import sys

import click

from .output import echo, emit_json, hint, json_option, table

TARGETS = ["vllm", "sglang", "lorax"]


def _resolve(app, ref: str):
    from ..refs import resolve_adapter

    return resolve_adapter(ref, app.registry_home)


def _registry_base(app, record) -> str | None:
    """The folder a registered adapter's base was fingerprinted from, when it still exists."""
    import os

    if record is None or not getattr(record, "base_fingerprint", None):
        return None
    try:
        row = app.registry().base_model(record.base_fingerprint)
    except Exception:  # the registry is a convenience here, never a reason to fail a check
        return None
    src = (row or {}).get("source")
    return src if src and os.path.isdir(src) else None


@click.command()
@click.argument("src", metavar="SRC")
@click.option("--for", "target", type=click.Choice(TARGETS), default="vllm", show_default=True,
              help="Serving target whose loader rules apply.")
@click.option("--base", "base_dir", type=click.Path(file_okay=False), metavar="BASE_DIR",
              help="Base model folder: module names, vocabulary size and architecture are checked against it "
              "(default: the registered base, when the registry knows its folder).")
@click.option("--max-lora-rank", type=int, metavar="N", help="The server's max_lora_rank (vLLM: 1, 8, 16, 32, 64, "
              "128, 256, 320 or 512).")
@json_option
@click.pass_obj
def check(app, src, target, base_dir, max_lora_rank, as_json):
    """Predict whether a server loads SRC and applies all of it (exit 0), or not (exit 1).

    SRC is a PEFT folder or a registry reference. The rules are the server's own
    (vLLM 0.33's loader, read from its source; see docs/serving.md): one line per
    problem, each naming its rule (rank, dora, modules_to_save, lora_bias, bias,
    init_lora_weights, layer_replication, module_match, ...). Warnings do not fail.

    \b
    Examples:
      adapters check ./my-adapter --for vllm
      adapters check support:prod --for vllm --base ./llama --max-lora-rank 16 --json
    """
    from ..serve import check as run_check

    folder, record = _resolve(app, src)
    base_dir = base_dir or _registry_base(app, record)
    result = run_check(folder, target, base_dir=base_dir, max_lora_rank=max_lora_rank)
    if as_json:
        emit_json(result.to_dict())
    else:
        from ..serve import get_profile

        verdict = "ok" if result.ok else "NOT SERVABLE"
        knob = get_profile(target).rank_setting
        need = f"{knob} >= {result.max_lora_rank_needed}, " if knob else ""
        echo(f"{result.server} {result.version}: {verdict}  (max rank {result.max_rank}, {need}"
             f"{result.modules} modules)")
        for p in result.problems:
            echo(f"{p.severity}: {p.rule}: {p.message}".replace("\n", " "))
    if not result.ok:
        sys.exit(1)  # the problems are the output; no extra error line


@click.command()
@click.argument("src", metavar="SRC")
@click.option("--for", "target", type=click.Choice(TARGETS), default="vllm", show_default=True,
              help="Serving target to write for.")
@click.option("--out", "-o", "out", type=click.Path(), required=True,
              help="Output folder (appears only when complete).")
@click.option("--max-rank", type=int, metavar="R", help="Compress modules above rank R with a truncated SVD "
              "(changes ΔW: the error is reported).")
@click.option("--base", "base_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="PiSSA / OLoRA / CorDA adapters: the original base model (PiSSA, OLoRA), or the initial adapter "
              "PEFT saved at init (any of them); converted exactly as PEFT's "
              "path_initial_model_for_weight_conversion does.")
@click.option("--rewrite-prefix", metavar="OLD=NEW", help="Rename modules whose names start with OLD.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@json_option
@click.pass_obj
def convert(app, src, target, out, max_rank, base_dir, rewrite_prefix, overwrite, as_json):
    """Write SRC as an adapter the server loads with the ΔW PEFT serves.

    What cannot be served equivalently is refused with one error line naming the
    feature, and nothing is written. Options that change the math say so and
    report the error (relative Frobenius norm, energy kept) like an svd merge.

    \b
    Examples:
      adapters convert ./pissa-adapter --for vllm --base ./llama --out ./served
      adapters convert ./r1024 --for vllm --max-rank 512 --out ./served
      adapters convert ./adapter --for lorax --out ./for-lorax
    """
    from ..fsutil import check_output
    from ..serve.convert import convert as run_convert

    check_output(out, registry_homes=[app.registry_home])  # the --registry home too; convert checks the inputs
    folder, record = _resolve(app, src)
    report = run_convert(folder, target, out, max_rank=max_rank, base_dir=base_dir,
                         rewrite_prefix=rewrite_prefix, overwrite=overwrite, parent=getattr(record, "ref", None))
    if as_json:
        emit_json(report.to_dict())
        return
    s = report.summary
    rows = [["output", report.output], ["target", f"{s['server']} {s['version']}"],
            ["changes", ", ".join(s["changes"]) or "none (written as is)"], ["exact", str(s["exact"]).lower()],
            ["ranks", ",".join(map(str, s["ranks"]))]]
    if target != "lorax":
        rows.append(["max_lora_rank", str(s["max_lora_rank_needed"])])
    if not s["exact"]:
        rows += [["rel_error", f"{s['rel_error']:.4g}"], ["energy_kept", f"{s['energy_kept']:.4g}"]]
    click.echo(table(rows))
    if report.modules:  # the compressed modules, worst first (as merge --method svd shows them)
        worst = sorted(report.modules, key=lambda m: -m["rel_error"])
        click.echo()
        click.echo(table([{k: m[k] for k in ("module", "from_rank", "rank", "rel_error", "energy_kept")}
                          for m in worst[:5]]))
        if len(worst) > 5:
            hint(f"({len(worst) - 5} more modules: --json shows all)")
    for w in report.warnings:
        hint(f"warning: {w}")


COMMANDS = [check, convert]
