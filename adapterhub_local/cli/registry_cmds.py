"""`adapters` verbs for the registry: register, list, show, alias, log-metric, export, rm, gc, verify.

Each command opens the registry, makes one library call and prints; no SQL here.
"""

from __future__ import annotations

import sys

import click

from .output import echo, emit_json, fmt, hint, human_bytes, json_option, table


def _reg(ctx: click.Context):
    return ctx.obj.registry()


def _short_fp(fp: str | None) -> str:
    return fp.split(":", 1)[-1][:12] if fp else "-"


def _when(ts: str | None) -> str:
    return ts.replace("T", " ")[:16] if ts else "-"


@click.command()
@click.argument("adapter_dir", type=click.Path())
@click.option("--name", "-n", required=True, help="Adapter name; each registration is its next version.")
@click.option("--base", "base_dir", type=click.Path(), metavar="MODEL_DIR",
              help="Base model folder: fingerprinted (cached), recorded, and the adapter's shapes checked.")
@click.option("--base-fingerprint", metavar="FP", help="Record this base fingerprint (sha256:...) without the model.")
@click.option("--metric", "metrics", multiple=True, metavar="KEY=VALUE", help="A metric, e.g. eval_loss=1.13 (repeat).")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="A tag, e.g. domain=legal (repeat).")
@click.option("--alias", "aliases", multiple=True, metavar="ALIAS", help="Point NAME:ALIAS here, e.g. prod (repeat).")
@click.option("--note", help="Free text kept with the version.")
@click.option("--parent", "parents", multiple=True, metavar="REF", help="A version this one was made from (repeat).")
@json_option
@click.pass_context
def register(ctx, adapter_dir, name, base_dir, base_fingerprint, metrics, tags, aliases, note, parents, as_json):
    """Store a PEFT LoRA folder as the next immutable version of NAME.

    The folder is validated, its files are stored once in the content-addressed
    blob store, and a version (1, 2, 3, ...) is recorded with rank, alpha,
    targets, size, base fingerprint and the PEFT config. Registering the same
    bytes under the same name again makes no new version (it says so). With
    --base the adapter must fit that model: every delta's shape is checked.

    \b
    Example:
      adapters register ./out/support --name support --base ./llama \\
          --metric eval_loss=1.13 --tag domain=support --alias staging
    """
    from ..registry import parse_pairs

    metric_values = parse_pairs(metrics, "metric")
    tag_values = parse_pairs(tags, "tag", numeric=False)
    rec = _reg(ctx).register(adapter_dir, name, base_dir=base_dir, base_fingerprint=base_fingerprint,
                             metrics=metric_values, tags=tag_values, aliases=aliases, note=note,
                             parents=parents, progress=True)
    if as_json:
        emit_json({**rec.to_dict(), "filled": bool(getattr(rec, "filled", False))})
        return
    if getattr(rec, "filled", False):
        echo(f"filled in {rec.ref}: these bytes are the weights its metadata (from `adapters sync`) recorded")
    elif rec.is_new:
        echo(f"registered {rec.ref}  rank {rec.rank}  alpha {fmt(rec.alpha)}  "
                   f"targets {','.join(rec.targets)}  {human_bytes(rec.size)}  base {_short_fp(rec.base_fingerprint)}")
    else:
        echo(f"unchanged {rec.ref}: these exact bytes are already that version; no new version made")
        if metric_values or tag_values or aliases:
            hint("the metrics, tags and aliases given were applied to it")
    if rec.aliases:
        hint(f"aliases: {', '.join(f'{rec.name}:{a}' for a in rec.aliases)}")


def _metric_columns(recs, where, sort, limit=3) -> list[str]:
    from ..registry import parse_where

    first = [c.key for c in parse_where(where)] if where else []
    if sort and sort.lstrip("-") not in ("created", "name", "rank", "alpha", "size", "version"):
        first.append(sort.lstrip("-"))
    counts: dict[str, int] = {}
    for r in recs:
        for k in {**r.claims, **r.metrics}:
            counts[k] = counts.get(k, 0) + 1
    cols = [k for k in dict.fromkeys(first) if k in counts]
    cols += [k for k in sorted(counts, key=lambda k: (-counts[k], k)) if k not in cols]
    return cols[: max(limit, len([k for k in first if k in counts]))]


@click.command(name="list")
@click.option("--name", metavar="GLOB", help="Only names matching this glob, e.g. 'legal-*'.")
@click.option("--base", metavar="FP|NAME",
              help="Only versions on this base (fingerprint, its prefix, or the base's name/path).")
@click.option("--alias", metavar="ALIAS", help="Only versions that ALIAS points at (e.g. prod).")
@click.option("--where", "where", multiple=True, metavar="COND",
              help="Metric condition: KEY OP NUMBER with OP in < <= > >= = != (repeat, or join with 'and'). "
              "rank, alpha, size and version work too.")
@click.option("--sort", metavar="KEY", help="Sort by a metric (ascending; '-key' for descending) or by "
              "created, name, version, rank, size. Default: newest first.")
@click.option("--limit", default=50, show_default=True, help="At most N rows (0: all).")
@click.option("--latest", is_flag=True, help="Only the newest version of each name.")
@click.option("--claims", is_flag=True, help="Let metrics claimed by a Hub source (pulled versions) count in "
              "--where and --sort where nothing was measured here. Default: local measurements only.")
@json_option
@click.pass_context
def list_cmd(ctx, name, base, alias, where, sort, limit, latest, claims, as_json):
    """List registered adapter versions, newest first.

    \b
    Examples:
      adapters list
      adapters list --where 'eval_loss<1.2' --sort eval_loss --limit 10
      adapters list --name 'legal-*' --alias prod --json
    """
    if claims:
        from ..registry.claims import rank_with_claims

        recs = rank_with_claims(_reg(ctx).list(name=name, base=base, alias=alias, limit=None, latest_only=latest),
                                where=where, sort=sort, limit=limit or None)
    else:
        recs = _reg(ctx).list(name=name, base=base, alias=alias, where=where, sort=sort,
                              limit=limit or None, latest_only=latest)
    if as_json:
        emit_json([r.to_dict() for r in recs])
        return
    if not recs:
        hint("no versions match" if (name or base or alias or where) else
             "the registry is empty: add one with `adapters register DIR --name NAME`")
        return
    cols = _metric_columns(recs, where, sort)
    rows = []
    for r in recs:
        row = {"name": r.name, "version": r.version, "aliases": ",".join(r.aliases) or "-",
               "base": _short_fp(r.base_fingerprint), "rank": r.rank}
        row.update({k: r.metrics.get(k, f"{fmt(r.claims[k])}*" if k in r.claims else None) for k in cols})
        row.update({"size": human_bytes(r.size) if r.has_weights else "no weights", "created": _when(r.created_at)})
        rows.append(row)
    echo(table(rows))
    if any(not r.has_weights for r in recs):
        hint("no weights: metadata only, recorded by `adapters sync`; `adapters pull ORG/NAME@vN` (see `adapters "
             "show`) or `adapters sync ORG --weights` downloads them")
    if any(k in r.claims and k not in r.metrics for r in recs for k in cols):
        hint("* claimed by the Hub repo it was pulled from, not measured here" +
             ("" if claims else " (not used by --where/--sort; --claims uses them)"))
    if limit and len(recs) == limit:
        hint(f"(first {limit}; --limit 0 shows all)")


@click.command()
@click.argument("ref")
@click.option("--history", is_flag=True, help="Every logged metric value (step, split), not just the latest.")
@json_option
@click.pass_context
def show(ctx, ref, history, as_json):
    """Everything about one version: files, config, base, metrics, aliases, lineage, merges, Hub pushes.

    REF is `name` (latest), `name@3`, `name:prod`, or a registered folder's path.

    \b
    Example:
      adapters show support:prod
      adapters show support@2 --json | jq .metrics
    """
    reg = _reg(ctx)
    rec = reg.resolve(ref)
    base = reg.base_model(rec.base_fingerprint) if rec.base_fingerprint else None
    merges = reg.merges_for(rec)
    lineage = reg.lineage(rec)
    hist = reg.metric_history(rec) if history else None
    if as_json:
        d = rec.to_dict()
        d.update({"base": base, "merges": merges, "ancestors": lineage["ancestors"],
                  "descendants": lineage["descendants"]})
        if hist is not None:
            d["metric_history"] = hist
        emit_json(d)
        return
    cfg = rec.config
    rows = [
        ["ref", rec.ref], ["aliases", ", ".join(rec.aliases) or "-"], ["created", _when(rec.created_at)],
        ["base fingerprint", rec.base_fingerprint or "-"],
        ["base model", (base or {}).get("name_or_path") or rec.base_model or "-"],
        ["rank", rec.rank], ["alpha", rec.alpha], ["rslora", bool(cfg.get("use_rslora")) if cfg else "-"],
        ["targets", ", ".join(rec.targets)], ["parameters", f"{rec.num_parameters or 0:,}"],
        ["size", human_bytes(rec.size) if rec.has_weights else "-"], ["content sha256", rec.content_sha256],
    ]
    if not rec.has_weights:
        o = rec.origin or {}
        src = f" (metadata from {o['repo_id']}@{o['version'] or o['commit_id'][:12]})" if o else ""
        rows.insert(1, ["weights", f"not downloaded{src}"])
    if base:
        rows.insert(5, ["base", f"{base.get('architecture') or '-'}, {base.get('dtype') or '-'}, "
                                f"{base.get('num_parameters') or 0:,} params"])
    if rec.tags:
        rows.append(["tags", ", ".join(f"{k}={v}" for k, v in sorted(rec.tags.items()))])
    if rec.note:
        rows.append(["note", rec.note])
    rows.append(["parents", ", ".join(rec.parents) or "-"])
    rows.append(["children", ", ".join(rec.children) or "-"])
    deeper = [a["ref"] for a in lineage["ancestors"] if a["depth"] > 1]
    if deeper:
        rows.append(["ancestors", ", ".join(deeper)])
    if rec.origin:
        o = rec.origin
        rows.append(["pulled from", f"{o['repo_id']}@{o['version'] or o['commit_id'][:12]} (commit "
                                    f"{o['commit_id']}, {o['endpoint']})"])
    for h in rec.hub:
        rows.append(["hub", f"{h['repo_id']}@{h['revision'] or 'main'} {h['commit_id'] or ''}".strip()])
    echo(table(rows))
    if rec.metrics:
        echo("\nmetrics")
        echo(table([[k, v] for k, v in sorted(rec.metrics.items())]))
    if rec.claims:
        echo(f"\nmetrics claimed by {rec.claims_source} (not measured here)")
        echo(table([[k, v] for k, v in sorted(rec.claims.items())]))
    if hist:
        echo("\nmetric history")
        echo(table(hist, ["key", "value", "step", "split", "logged_at"]))
    for title, key in (("made by", "made_by"), ("used in", "used_in")):
        for m in merges[key]:
            ins = ", ".join(f"{i['ref']}" + (f"×{fmt(i['weight'])}" if i["weight"] is not None else "")
                            for i in m["inputs"])
            echo(f"\n{title} merge #{m['id']}: {m['method']}({ins}) -> {m['output_version'] or m['output']}")
    _show_files(rec)


def _show_files(rec) -> None:
    if not rec.has_weights:
        listed = rec.provenance.get("files") if isinstance(rec.provenance.get("files"), dict) else {}
        echo("\nfiles (as its Hub repo lists them; not downloaded)")
        echo(table([[fn, "-", sha] for fn, sha in sorted(listed.items())], ["file", "size", "sha256"]))
        return
    echo("\nfiles")
    echo(table([[fn, human_bytes(rec.file_sizes.get(fn)), sha] for fn, sha in rec.files.items()],
               ["file", "size", "sha256"]))


@click.command()
@click.argument("ref")
@click.argument("alias")
@click.option("--rm", "remove", is_flag=True, help="Remove ALIAS from adapter REF (given as a plain NAME).")
@json_option
@click.pass_context
def alias(ctx, ref, alias, remove, as_json):
    """Point NAME:ALIAS at a version (moving it atomically), or remove it with --rm.

    \b
    Examples:
      adapters alias support@3 prod       # support:prod now means support@3
      adapters alias --rm support staging
    """
    reg = _reg(ctx)
    if remove:
        was = reg.remove_alias(ref, alias)
        if as_json:
            emit_json({"alias": f"{ref}:{alias}", "removed": True, "was": was})
        else:
            echo(f"removed {ref}:{alias} (was {was})")
        return
    rec, prev = reg.set_alias(ref, alias)
    if as_json:
        emit_json({"alias": f"{rec.name}:{alias}", "ref": rec.ref, "previous": prev})
        return
    moved = f" (was {prev})" if prev and prev != rec.ref else ""
    echo(f"{rec.name}:{alias} -> {rec.ref}{moved}")


@click.command(name="log-metric")
@click.argument("ref")
@click.argument("pairs", nargs=-1, required=True, metavar="KEY=VALUE...")
@click.option("--step", type=int, help="Training step these values belong to.")
@click.option("--split", help="Data split, e.g. eval: `loss` is then filtered as `eval_loss`.")
@click.option("--push", "push", is_flag=True, help="Also record them on every Hub repo this version was "
              "pushed to as vN (a small commit to adapterhub.json; not a new version).")
@click.option("--token", metavar="T", help="Hub token for --push (default: $HF_TOKEN).")
@json_option
@click.pass_context
def log_metric(ctx, ref, pairs, step, split, push, token, as_json):
    """Record metric values for a version (every value is kept; the latest counts).

    \b
    Example:
      adapters log-metric support@3 eval_loss=1.08 accuracy=0.91 --step 2000
      adapters log-metric support@3 loss=1.08 --split eval     # shows as eval_loss
      adapters log-metric support@3 win_rate=0.62 --push       # every machine sees it
    """
    from ..registry import parse_pairs

    values = parse_pairs(pairs, "metric")
    rec = _reg(ctx).log_metrics(ref, values, step=step, split=split)
    pushed = []
    if push:
        from ..hub.team import push_logged_metrics
        from .hub_cmds import _quiet_hf

        _quiet_hf()
        pushed = push_logged_metrics(rec, values, split=split, token=token, registry_home=ctx.obj.registry_home)
    if as_json:
        emit_json({"ref": rec.ref, "metrics": rec.metrics, **({"pushed": pushed} if push else {})})
        return
    for p in pushed:
        hint(f"pushed to {p['repo_id']}@{p['version']}" + (" (already there)" if p["unchanged"] else
                                                           f": commit {p['commit_id'][:12]}"))
    echo(f"{rec.ref}: " + "  ".join(f"{k}={fmt(v)}" for k, v in sorted(rec.metrics.items())))


@click.command()
@click.argument("ref")
@click.argument("out_dir", type=click.Path())
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
@json_option
@click.pass_context
def export(ctx, ref, out_dir, overwrite, as_json):
    """Write a version as a plain PEFT folder (PEFT loads it), plus adapterhub.json
    (registry name, version, base fingerprint, lineage, metrics; see docs/hub.md). Every
    blob is re-hashed on the way.

    \b
    Example:
      adapters export support:prod ./support-prod
    """
    reg = _reg(ctx)
    rec = reg.resolve(ref)
    out = reg.export(rec, out_dir, overwrite=overwrite)
    if as_json:
        emit_json({"ref": rec.ref, "path": str(out), "files": sorted({*rec.files, "adapterhub.json"})})
        return
    echo(f"exported {rec.ref} to {out}")


@click.command()
@click.argument("ref")
@click.option("--force", is_flag=True, help="Remove even when a merge or a child version depends on it.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation on a terminal.")
@json_option
@click.pass_context
def rm(ctx, ref, force, yes, as_json):
    """Remove one version. Refused while a later merge depends on it (unless --force);
    blobs still used by other versions are kept. Version numbers are never reused.

    \b
    Example:
      adapters rm support@1
    """
    reg = _reg(ctx)
    rec = reg.resolve(ref)
    if not yes and sys.stdin.isatty() and not as_json:
        click.confirm(f"remove {rec.ref}?", abort=True, err=True)
    report = reg.rm(rec, force=force)
    if as_json:
        emit_json(report)
        return
    echo(f"removed {report['removed']}; freed {human_bytes(report['bytes_freed'])} "
               f"({report['blobs_removed']} blob(s))")


@click.command()
@click.option("--dry-run", is_flag=True, help="Report what would be removed; remove nothing.")
@json_option
@click.pass_context
def gc(ctx, dry_run, as_json):
    """Remove blobs no version references (left by a crash, or by rm), temp files of dead
    writers and stale checkouts; report the bytes freed.

    \b
    Example:
      adapters gc --dry-run
    """
    report = _reg(ctx).gc(dry_run=dry_run)
    if as_json:
        emit_json(report)
        return
    verb = "would free" if dry_run else "freed"
    echo(f"{verb} {human_bytes(report['bytes_freed'])}: {report['blobs_removed']} blob(s), "
               f"{report['temp_files_removed']} temp file(s), {report['checkouts_removed']} checkout(s)")


@click.command()
@click.argument("ref", required=False)
@json_option
@click.pass_context
def verify(ctx, ref, as_json):
    """Re-hash blobs and check every version's files point at an existing, intact blob
    (one version with REF). Exits 1 on any problem; orphan blobs are reported (gc removes them).

    \b
    Example:
      adapters verify
      adapters verify support@2 --json
    """
    from ..errors import RegistryError

    report = _reg(ctx).verify(ref)
    if as_json:
        emit_json(report)
    else:
        for p in report["problems"]:
            echo(f"PROBLEM {p.get('ref') or ''} {p.get('file') or ''}: {p['problem']}".replace("  ", " "))
        for o in report["orphans"]:
            echo(f"orphan {o}")
        for m in report["metadata_only"]:
            echo(f"metadata only {m}: no weights here to check (`adapters pull` downloads them)")
        echo(f"{'ok' if report['ok'] else 'FAILED'}: {report['versions']} version(s), {report['files']} "
                   f"file(s), {report['blobs']} blob(s), {human_bytes(report['bytes_hashed'])} re-hashed, "
                   f"{len(report['problems'])} problem(s), {len(report['orphans'])} orphan(s)")
        if report["orphans"] and report["ok"]:
            hint("orphans are harmless leftovers; `adapters gc` removes them")
    if not report["ok"]:
        raise RegistryError(f"verify found {len(report['problems'])} problem(s), listed above",
                            "restore the damaged files, or `adapters rm` the affected versions")


COMMANDS = [register, list_cmd, show, alias, log_metric, export, rm, gc, verify]
