"""`adapters inspect` and `adapters fingerprint`."""

from __future__ import annotations

import click

from .output import emit_json, hint, human_bytes, json_option, table


@click.command()
@click.argument("adapter_dir", type=click.Path())
@click.option("--modules/--no-modules", default=True, help="List every module with its ‖ΔW‖.")
@json_option
def inspect(adapter_dir: str, modules: bool, as_json: bool) -> None:
    """Show what a PEFT LoRA folder holds: ranks, alphas, scaling, targets,
    trainable parameters, base model and the Frobenius norm ‖ΔW‖ of every module.

    \b
    Example:
      adapters inspect ./my-adapter
      adapters inspect ./my-adapter --json | jq '.modules[0]'
    """
    from ..peft_format import adapter_summary, load_adapter

    summary = adapter_summary(load_adapter(adapter_dir))
    if as_json:
        emit_json(summary)
        return
    rows = [
        ("path", summary["path"]), ("base model", summary["base_model"]),
        ("ranks", summary["ranks"]), ("alphas", summary["alphas"]),
        ("scaling", summary["scalings"]), ("rslora", summary["use_rslora"]),
        ("targets", summary["targets"]), ("modules", summary["num_modules"]),
        ("trainable params", f"{summary['trainable_parameters']:,}"),
    ]
    if summary["rank_pattern"]:
        rows.append(("rank_pattern", summary["rank_pattern"]))
    if summary["alpha_pattern"]:
        rows.append(("alpha_pattern", summary["alpha_pattern"]))
    if summary["modules_to_save"]:
        rows.append(("modules_to_save", summary["modules_to_save"]))
    if summary["dora_modules"]:
        rows.append(("DoRA modules", summary["dora_modules"]))
    if summary["expert_lora"]:
        rows.append(("target_parameters", summary["target_parameters"]))
        rows.append(("expert LoRA", f"{len(summary['expert_lora'])} wrappers (their parameter is matched "
                                    "on the base at merge time; --json lists them)"))
    click.echo(table([[k, v] for k, v in rows]))
    for note in summary["notes"]:
        hint(f"note: ignored {note}")  # names from the adapter: escaped
    if modules:
        click.echo()
        click.echo(table(
            [{"module": m["module"], "kind": m["kind"] + (" (DoRA)" if "dora" in m else ""), "r": m["r"],
              "scaling": m["scaling"], "shape": "x".join(map(str, m["delta_shape"])), "norm": m["delta_norm"],
              **({"magnitude min/mean/max": "{magnitude_min:.4g} / {magnitude_mean:.4g} / {magnitude_max:.4g}"
                  .format(**m["dora"])} if summary["dora_modules"] and "dora" in m else
                 ({"magnitude min/mean/max": ""} if summary["dora_modules"] else {}))}
             for m in summary["modules"]],
        ))


@click.command()
@click.argument("model_dir", type=click.Path())
@click.option("--no-cache", is_flag=True, help="Re-hash even when a cached fingerprint is valid.")
@click.option("--tensors", is_flag=True, help="With --json, include every tensor's digest.")
@json_option
def fingerprint(model_dir: str, no_cache: bool, tensors: bool, as_json: bool) -> None:
    """Fingerprint a base model folder (safetensors, sharded or not).

    The fingerprint is a sha256 over every tensor's name, dtype, shape and bytes,
    so it survives re-sharding and renaming; beside it each file's plain sha256
    (what the Hub shows as the LFS oid). Results are cached by real path, size
    and mtime: a second look costs nothing.

    \b
    Example:
      adapters fingerprint ./TinyLlama-1.1B
    """
    from ..fingerprint import fingerprint_model

    fp = fingerprint_model(model_dir, use_cache=not no_cache, progress=True)
    if as_json:
        emit_json(fp.to_dict(with_tensors=tensors))
        return
    click.echo(table([
        ["fingerprint", fp.fingerprint],
        ["architecture", fp.architecture],
        ["dtype", fp.dtype],
        ["parameters", f"{fp.num_parameters:,}"],
        ["tensors", fp.num_tensors],
        ["size", human_bytes(fp.total_bytes)],
        ["cached", fp.cached],
    ]))
    click.echo()
    click.echo(table([[name, h] for name, h in sorted(fp.files.items())], ["file", "sha256"]))


COMMANDS = [inspect, fingerprint]
