"""`adapters merge | interpolate | stack | extract`: thin commands over adapterhub_local.merge."""

from __future__ import annotations

import click

from .output import emit_json, fmt, hint, human_bytes, json_option, table

DTYPES = ["auto", "bfloat16", "float16", "float32"]


def _check_out(app, out, paths=()) -> None:
    """Refuse --out early (before any input is read) when it is, holds or lies inside an input
    folder given on the line or the registry home; the library checks again with every input."""
    import os

    from ..fsutil import check_output

    check_output(out, [p for p in paths if os.path.isdir(p)], [app.registry_home])


def _register(app, report, out, name: str | None, inputs, *, adapter: bool) -> None:
    """Record the merge (and, for adapters, the new version with its parents) in the registry.

    Without --register the merge is still recorded (recipe, inputs, output path) when a
    registry exists or an input came from one; nothing creates a registry uninvited.
    """
    import os

    if not name:
        if not (any(i.record is not None for i in inputs) or (app.registry_home / "registry.db").is_file()):
            return
        recipe = report.recipe
        params = dict(recipe.get("parameters") or {})
        params.setdefault("via", recipe.get("via"))
        merge_id = app.registry().record_merge(
            inputs=[i.record or str(i.folder) for i in inputs], weights=[i.weight for i in inputs],
            method=str(recipe.get("method")), params=params, output=os.path.abspath(out), recipe=recipe)
        report.registered = {"merge_id": merge_id, "output": os.path.abspath(out)}
        return
    reg = app.registry()
    parents = [i.record if i.record is not None else str(i.folder) for i in inputs]
    recipe = report.recipe
    params = dict(recipe.get("parameters") or {})
    params.setdefault("via", recipe.get("via"))
    if adapter:
        from .. import provenance

        rec = reg.register(out, name, base_fingerprint=provenance.base_fingerprint(provenance.read(out)),
                           parents=parents,
                           provenance={"recipe": recipe}, note=f"{recipe.get('operation')}: {recipe.get('method')}",
                           tags={"merge": str(recipe.get("method"))})
        merge_id = reg.record_merge(inputs=[i.record or str(i.folder) for i in inputs],
                                    weights=[i.weight for i in inputs],
                                    method=str(recipe.get("method")), params=params, output=rec.ref,
                                    recipe=recipe, output_version=rec)
        report.registered = {"ref": rec.ref, "merge_id": merge_id, "is_new": getattr(rec, "is_new", True)}
        hint(f"registered {rec.ref} (merge #{merge_id}, parents: {', '.join(rec.parents) or 'none'})")
    else:
        merge_id = reg.record_merge(inputs=[i.record or str(i.folder) for i in inputs],
                                    weights=[i.weight for i in inputs], method="linear",
                                    params={**params, "name": name},
                                    output=os.path.abspath(out), recipe=recipe)
        report.registered = {"name": name, "merge_id": merge_id, "output": os.path.abspath(out)}
        hint(f"recorded merge #{merge_id} ({name}) in the registry; a merged model is not an adapter "
             "version, so it is recorded as a merge output")


def _show(report, as_json: bool) -> None:
    if as_json:
        emit_json(report.to_dict())
        return
    s = report.summary
    rows = [["operation", report.operation], ["output", report.output]]
    if report.inputs:
        rows.append(["inputs", ", ".join(f"{i['ref']} x{i['weight']:g}" for i in report.inputs)])
    if report.method:
        via = s.get("via")
        rows.append(["method", report.method + (f" (via {via})" if via and via != report.method else "")])
    for k in ("exact", "rank", "ranks", "density", "seed", "modules", "rel_error", "energy_kept",
              "tensors", "modified", "shards", "dtype", "untied", "trainable_parameters"):
        if k in s and s[k] is not None:
            rows.append([k, fmt(s[k]) if not isinstance(s[k], bool) else str(s[k]).lower()])
    if "bytes_written" in s:
        rows.append(["size", human_bytes(s["bytes_written"])])
    if report.fingerprint.get("base"):
        fp = report.fingerprint
        state = "verified" if fp.get("verified") and not fp.get("unknown") else (
            "unverified (base unknown)" if fp.get("unknown") else "MISMATCH (forced)")
        rows.append(["base", f"{fp['base']} ({fp.get('source', 'fingerprint')}; {state})"
                     if "source" in fp else fp["base"]])
    rows.append(["time", f"{report.time_s:.2f} s"])
    rows.append(["peak memory", f"{report.peak_rss_mb:.0f} MB"])
    if report.registered:
        reg = report.registered
        rows.append(["registry", " ".join(x for x in (reg.get("ref") or reg.get("name"),
                                                      f"merge #{reg['merge_id']}") if x)])
    click.echo(table(rows))
    mods = [m for m in report.modules if "rel_error" in m]
    if mods:
        worst = sorted(mods, key=lambda m: -m["rel_error"])[:5]
        click.echo()
        click.echo(table([{"module": m["module"], "rank": m["rank"], "norm": m["norm"],
                           "rel_error": m["rel_error"], "energy_kept": m["energy_kept"]} for m in worst]))
        if len(mods) > 5:
            hint(f"({len(mods) - 5} more modules: --json shows all)")


@click.command()
@click.argument("args", nargs=-1, metavar="[BASE_DIR] REF [REF ...]")
@click.option("--out", "-o", "out", type=click.Path(), required=True,
              help="Output folder (appears only when complete).")
@click.option("--weights", "-w", metavar="W1,W2,..", help="One weight per adapter (default 1 each).")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Output dtype of the merged model's floating tensors (auto: keep each tensor's).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 2GB, 500MB.")
@click.option("--into-adapter", is_flag=True, help="Combine the adapters into a new PEFT adapter (no base model).")
@click.option("--method", default=None, metavar="NAME",
              help="With --into-adapter: cat | linear | svd | ties | dare_linear | dare_ties | magnitude_prune "
              "(default cat).")
@click.option("--rank", type=int, help="Target rank for svd-family methods (linear --rank R means via svd).")
@click.option("--density", type=float, help="Share of entries kept by ties / dare / magnitude_prune (default 0.5).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of DARE's random masks.")
@click.option("--recipe", "recipe_path", type=click.Path(), help="Replay a recipe.yaml (byte-identical output).")
@click.option("--register", "register_name", metavar="NAME",
              help="Record the result (and its lineage) in the registry.")
@click.option("--force", is_flag=True, help="Merge even if the base fingerprint does not match (noted in the card).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (atomically, when complete).")
@json_option
@click.pass_obj
def merge(app, args, out, weights, dtype, max_shard_size, into_adapter, method, rank, density, seed,
          recipe_path, register_name, force, overwrite, as_json):
    """Merge LoRA adapters into a base model, or into a new adapter.

    Into a base (streamed shard by shard, float32 math, one cast at the end):
    W' = W + Σ wᵢ·sᵢ·Bᵢ·Aᵢ. The base's fingerprint is checked against each
    adapter's recorded base while streaming; a mismatch aborts (--force overrides).
    DoRA adapters merge as PEFT merges them, W ← m/‖W₀+ΔW‖·(W+ΔW), one after
    another in command-line order: with DoRA the ORDER OF THE REFs MATTERS (it gives
    what PEFT's merge_and_unload gives merging them in that order).

    Into an adapter (--into-adapter), in ΔW space: cat is exact (rank Σrᵢ);
    linear is the weighted sum of deltas (exact via cat, or via svd with --rank);
    svd, ties, dare_linear, dare_ties and magnitude_prune end in a truncated SVD
    and report the error against the exact weighted sum.

    REF is a registry reference (name, name@3, name:prod) or a PEFT folder.
    Every merge writes recipe.yaml; --recipe replays one.

    \b
    Examples:
      adapters merge ./base support:prod legal@2 --weights 0.7,0.3 --out ./merged
      adapters merge ./base ./my-adapter --out ./merged --dtype bfloat16 --max-shard-size 2GB
      adapters merge support legal --into-adapter --method cat --out ./combo --register combo
      adapters merge a b c --into-adapter --method ties --density 0.3 --rank 16 --out ./ties
      adapters merge --recipe ./merged/recipe.yaml --out ./again
      adapters merge /new/place/of/base --recipe ./merged/recipe.yaml --out ./again
    """
    from ..errors import AdapterHubError
    from ..merge.inputs import parse_weights, resolve_inputs

    home = app.registry_home
    _check_out(app, out, args)
    if recipe_path:
        if len(args) > 1:
            raise click.UsageError("--recipe replays a recipe: give no REF with it (one BASE_DIR at most, "
                                   "to replay on a base that moved; its fingerprint must still match)")
        from ..merge.recipe import load_recipe
        from ..merge.replay import replay

        recipe = load_recipe(recipe_path)
        report = replay(recipe, out, overwrite=overwrite, registry_home=home, progress=not as_json,
                        base_dir=args[0] if args else None)
        _show(report, as_json)
        return
    if not args:
        raise click.UsageError("give BASE_DIR and at least one REF (or --into-adapter REF REF ..., or --recipe)")
    if into_adapter:
        if dtype != "auto" or max_shard_size != "5GB":
            raise click.UsageError("--dtype and --max-shard-size apply to merges into a base model")
        from ..merge.algebra import merge_adapters
        from ..merge.methods import get_method

        method = method or "cat"
        get_method(method)
        inputs = resolve_inputs(args, parse_weights(weights, len(args)), home)
        report = merge_adapters(inputs, out, method=method, rank=rank, density=density, seed=seed,
                                overwrite=overwrite, force=force)
        _register(app, report, out, register_name, inputs, adapter=True)
        _show(report, as_json)
        return
    if method not in (None, "linear"):
        raise click.UsageError(f"--method {method} needs --into-adapter; a merge into a base is always "
                               "W + Σ wᵢ·ΔWᵢ (combine adapters first, then merge the result)")
    if rank is not None or density is not None:
        raise click.UsageError("--rank and --density apply to --into-adapter merges")
    if len(args) < 2:
        raise click.UsageError("give BASE_DIR and at least one REF")
    import os

    base, refs = args[0], args[1:]
    if not os.path.isdir(base):
        raise AdapterHubError(f"{base}: base model folder not found",
                              "the first argument is BASE_DIR; add --into-adapter to combine adapters only")
    from ..merge.base import merge_into_base

    inputs = resolve_inputs(refs, parse_weights(weights, len(refs)), home)  # no torch
    report = merge_into_base(base, inputs, out, dtype=dtype, max_shard_size=max_shard_size, force=force,
                             overwrite=overwrite, progress=not as_json)
    _register(app, report, out, register_name, inputs, adapter=False)
    _show(report, as_json)


@click.command()
@click.argument("a")
@click.argument("b")
@click.option("--t", "t", type=float, required=True, help="0 gives A, 1 gives B.")
@click.option("--out", "-o", type=click.Path(), required=True, help="Output adapter folder.")
@click.option("--rank", type=int, help="Compress to this rank with svd (default: exact, rank rA+rB).")
@click.option("--register", "register_name", metavar="NAME", help="Register the result with A and B as parents.")
@click.option("--force", is_flag=True, help="Combine even if A and B were trained on different bases.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@json_option
@click.pass_obj
def interpolate(app, a, b, t, out, rank, register_name, force, overwrite, as_json):
    """Interpolate two adapters in ΔW space: (1-t)·ΔA + t·ΔB.

    Exact by default (cat of the two, weights folded in); --rank R compresses
    the result with a truncated SVD and reports the error. This is NOT the
    interpolation of A and B factors separately (which adds cross terms).

    \b
    Example:
      adapters interpolate support legal --t 0.3 --out ./support-legal-30
      adapters interpolate ./a ./b --t 0.5 --rank 8 --out ./mid --json
    """
    from ..merge.algebra import interpolate as run
    from ..merge.inputs import resolve_inputs

    _check_out(app, out, [a, b])
    inputs = resolve_inputs([a, b], None, app.registry_home)
    report = run(inputs[0], inputs[1], t, out, rank=rank, overwrite=overwrite, force=force)
    _register(app, report, out, register_name, inputs, adapter=True)
    _show(report, as_json)


@click.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("--out", "-o", type=click.Path(), required=True, help="Output adapter folder.")
@click.option("--weights", "-w", metavar="W1,W2,..", help="One weight per adapter (default 1 each).")
@click.option("--register", "register_name", metavar="NAME", help="Register the result with its parents.")
@click.option("--force", is_flag=True, help="Combine even if the adapters were trained on different bases.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@json_option
@click.pass_obj
def stack(app, refs, out, weights, register_name, force, overwrite, as_json):
    """Stack adapters: the exact sum of their deltas, as one adapter of rank Σrᵢ.

    \b
    Example:
      adapters stack support legal tone --out ./all-three
      adapters stack ./a ./b --weights 1,-1 --out ./a-minus-b
    """
    from ..merge.algebra import stack as run
    from ..merge.inputs import parse_weights, resolve_inputs

    _check_out(app, out, refs)
    inputs = resolve_inputs(refs, parse_weights(weights, len(refs)), app.registry_home)
    report = run(inputs, out, overwrite=overwrite, force=force)
    _register(app, report, out, register_name, inputs, adapter=True)
    _show(report, as_json)


@click.command()
@click.argument("base_dir", type=click.Path())
@click.argument("tuned_dir", type=click.Path())
@click.option("--rank", type=int, required=True, help="Rank of every module (with --energy: the largest).")
@click.option("--energy", type=float, help="Per module, the smallest rank keeping this share of ‖ΔW‖² (e.g. 0.99).")
@click.option("--out", "-o", type=click.Path(), required=True, help="Output adapter folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomised SVD on large modules.")
@click.option("--register", "register_name", metavar="NAME", help="Register the extracted adapter.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@json_option
@click.pass_obj
def extract(app, base_dir, tuned_dir, rank, energy, out, seed, register_name, overwrite, as_json):
    """Extract a LoRA adapter from the difference of two full models.

    Streams both models; each 2-D weight that differs gets a truncated SVD of
    ΔW = tuned − base. The report gives each module's relative error and the
    energy kept; differences a LoRA cannot hold (norms, biases) are listed.

    \b
    Example:
      adapters extract ./base ./finetuned --rank 16 --out ./extracted
      adapters extract ./base ./finetuned --rank 64 --energy 0.99 --out ./extracted --json
    """
    from ..merge.extract import extract_lora

    _check_out(app, out, [base_dir, tuned_dir])
    report = extract_lora(base_dir, tuned_dir, out, rank=rank, energy=energy, seed=seed,
                          overwrite=overwrite, progress=not as_json)
    _register(app, report, out, register_name, [], adapter=True)
    _show(report, as_json)


COMMANDS = [merge, interpolate, stack, extract]
