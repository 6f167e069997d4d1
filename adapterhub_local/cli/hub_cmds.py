"""`adapters push` and `adapters pull`: the Hub, through adapterhub_local.hub."""

from __future__ import annotations

import click

from .output import echo, emit_json, hint, human_bytes, json_option, table


def _quiet_hf() -> None:
    """huggingface_hub's own bars and log lines follow our rule: only on a terminal."""
    from huggingface_hub.utils import disable_progress_bars, logging

    from ..progress import enabled

    if not enabled():
        disable_progress_bars()
    logging.set_verbosity_error()


@click.command()
@click.argument("ref_or_dir", metavar="REF_OR_DIR")
@click.argument("repo_id", metavar="REPO_ID")
@click.option("--private", is_flag=True, help="Create the repo private; refused (nothing sent) when it exists "
              "and is public.")
@click.option("--revision", metavar="BRANCH", help="Push to this branch (created from main if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request against main instead of committing to it.")
@click.option("--commit-message", metavar="TEXT", help="Commit title (default: what was uploaded).")
@click.option("--token", metavar="T", help="Hub token (default: $HF_TOKEN, else the one `hf auth login` stored).")
@click.option("--card", "card", metavar="TEMPLATE.md", type=click.Path(dir_okay=False),
              help="Your README template (Jinja: {{ card_data }}, {{ details }}, {{ recipe }}, {{ files }}, ...); "
              "metadata it does not set is filled in.")
@click.option("--base-model", "base_model", multiple=True, metavar="HUB_ID",
              help="The base model's Hub id for the card, when the adapter records only a local path (repeat "
              "for merges of several).")
@click.option("--dry-run", is_flag=True, help="Build the exact folder and card locally, list it, send nothing.")
@click.option("--dry-run-dir", metavar="DIR", type=click.Path(file_okay=False),
              help="Where --dry-run writes the folder (new or empty; default: a new temp dir).")
@json_option
@click.pass_context
def push(ctx, ref_or_dir, repo_id, private, revision, create_pr, commit_message, token, card, base_model,
         dry_run, dry_run_dir, as_json):
    """Publish an adapter or a merged model to the Hub as its next version vN.

    REF_OR_DIR is a registry reference (name, name@3, name:prod), a PEFT adapter
    folder, or a merged model folder (`adapters merge` output). The upload holds
    the files, a README.md model card (base_model, base_model_relation,
    library_name, tags, registry metrics as model-index, the recipe, the inputs'
    versions and hashes, the base fingerprint) and adapterhub.json, the same
    provenance for machines. The repo is created if missing. A push of a
    registry version is recorded on it (see `adapters show`).

    A push to main is numbered: it becomes the repo's next version, a tag vN
    on its commit, race-free (two people pushing at once get v7 and v8; see
    docs/team.md). Pushing what the repo already holds makes no new version.

    Tokens: --token, else $HF_TOKEN, else `hf auth login`. A self-hosted Hub:
    set HF_ENDPOINT=https://hub.example.com (and HF_HUB_DISABLE_XET=1 if it only
    speaks git-LFS). If a push fails half-way, run the same command again: files
    already uploaded are not sent twice.

    \b
    Examples:
      adapters push support:prod my-team/support-lora --dry-run
      adapters push support:prod my-team/support-lora --private
      adapters push ./merged my-team/llama-support --revision exp --commit-message "w=0.7"
    """
    from ..hub.push import push as do_push

    if dry_run_dir and not dry_run:
        raise click.UsageError("--dry-run-dir only makes sense with --dry-run")
    if not dry_run:
        _quiet_hf()
    res = do_push(ref_or_dir, repo_id, private=private, revision=revision, create_pr=create_pr,
                  commit_message=commit_message, token=token, dry_run=dry_run, dry_run_dir=dry_run_dir,
                  card_template=card, base_model=base_model, registry_home=ctx.obj.registry_home)
    if not res.base_models and res.base_name:
        hint(f"the base {res.base_name} is not a Hub id: the card gets no base_model/base_model_relation and the "
             "Hub will not link it to its base (give --base-model ORG/NAME)")
    if as_json:
        emit_json(res.to_dict())
        return
    if res.dry_run:
        echo(f"dry run: nothing was sent. {repo_id} would receive ({res.kind}):")
        rows = [[f.path, human_bytes(f.size), f.sha256[:16]] for f in res.files]
        echo(table(rows, ["file", "size", "sha256"]))
        echo(f"{len(res.files)} files, {human_bytes(res.total_bytes)}")
        echo(f"folder: {res.staged_dir}")
        return
    where = res.revision if not res.pr_url else f"pull request {res.revision}"
    if res.version is not None:
        a = res.attempts or {}
        for k in a.get("repaired") or []:
            hint(f"tagged v{k}: a push before this one had committed it but not tagged it")
        if res.unchanged:
            echo(f"unchanged: {repo_id} already holds exactly these files as v{res.version}; "
                       f"commit {res.commit_id}")
        else:
            echo(f"pushed {res.registry_ref or ref_or_dir} to {repo_id} as v{res.version}: "
                       f"{len(res.files)} files, {human_bytes(res.total_bytes)}")
            echo(f"commit {res.commit_id}")
        if a.get("stale_parent") or a.get("tag_taken"):
            hint(f"others pushed at the same moment: {a['stale_parent']} commit(s) refused on a stale head, "
                 f"{a['tag_taken']} tag(s) taken; retried")
    elif res.unchanged:
        echo(f"unchanged: {repo_id} ({where}) already holds exactly these files; commit {res.commit_id}")
    else:
        echo(f"pushed {res.registry_ref or ref_or_dir} to {repo_id} ({where}): "
                   f"{len(res.files)} files, {human_bytes(res.total_bytes)}")
        echo(f"commit {res.commit_id}")
    echo(res.pr_url or res.url or res.commit_url)
    if res.registry_ref:
        hint(f"recorded on {res.registry_ref}; see `adapters show {res.registry_ref}`")


@click.command()
@click.argument("spec", metavar="REPO_ID[@REVISION|:ALIAS]")
@click.option("--name", "-n", help="Registry name (default: the repo name).")
@click.option("--base", "base", metavar="MODEL_DIR", type=click.Path(file_okay=False),
              help="Check every adapted module's shape against this base (and its fingerprint against the "
              "published one) and record it.")
@click.option("--token", metavar="T", help="Hub token for private repos (default: $HF_TOKEN, else `hf auth login`).")
@click.option("--force", is_flag=True, help="Register even if --base's fingerprint differs from the published base.")
@json_option
@click.pass_context
def pull(ctx, spec, name, base, token, force, as_json):
    """Download a LoRA adapter repo into the registry as a new version.

    The repo must hold a PEFT LoRA adapter (adapter_config.json and
    adapter_model.safetensors). Every file is checked against the Hub's hashes
    and, when the repo was published by `adapters push`, against adapterhub.json,
    whose lineage, metrics and base fingerprint come along. Pulling the same
    revision again makes no new version. Nothing is registered unless every
    check passes. @vN pulls a team version, :ALIAS the version an alias points
    at now (the record keeps vN). Metrics that come along are the repo's
    claims: `show` prints them apart, `list` ranks by them only with --claims.
    A version `adapters sync` recorded as metadata only gets its weights (the
    same record and ref), once they match the hashes it recorded.

    \b
    Examples:
      adapters pull my-team/support-lora
      adapters pull my-team/support-lora@v2 --name support --base ./llama
      adapters pull my-team/support-lora:prod
    """
    from ..hub.pull import pull as do_pull

    _quiet_hf()
    res = do_pull(spec, name=name, base=base, token=token, force=force, registry_home=ctx.obj.registry_home)
    if as_json:
        emit_json(res.to_dict())
        return
    rec = res.record
    src = f"{res.repo_id}@{res.revision} (commit {res.commit_id[:12]})"
    if res.alias:
        src = f"{res.repo_id}:{res.alias} = {res.revision} (commit {res.commit_id[:12]})"
    if res.filled:
        echo(f"filled in {rec.ref}: the weights of {src}, checked against the metadata `adapters sync` recorded")
    elif res.is_new:
        echo(f"pulled {src} -> {rec.ref}  rank {rec.rank}  base "
                   f"{(rec.base_fingerprint or '-').split(':', 1)[-1][:12]}")
    else:
        echo(f"unchanged: {src} is already {rec.ref}; no new version made")
    if res.parents_linked:
        hint(f"lineage: parents {', '.join(res.parents_linked)}")
    if res.parents_missing:
        hint(f"lineage: parents not in this registry (kept in provenance): {', '.join(res.parents_missing)}")
    if res.provenance is None:
        hint("no adapterhub.json in the repo: lineage and base fingerprint unknown (give --base to record one)")
    if res.claims:
        hint(f"metrics claimed by {res.repo_id}@{res.revision} (kept as its claims, not measured here): "
             + "  ".join(f"{k}={v:g}" for k, v in sorted(res.claims.items())))
    for w in res.warnings:
        hint(f"warning: {w}")


COMMANDS = [push, pull]
