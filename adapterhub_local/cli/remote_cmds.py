"""`adapters remote list|alias` and `adapters sync`: a Hub namespace as the team's registry."""

from __future__ import annotations

import click

from .output import echo, emit_json, fmt, hint, json_option, table


def _quiet_hf() -> None:
    from .hub_cmds import _quiet_hf as quiet

    quiet()


@click.group()
def remote():
    """The team's registry on a Hub namespace: versions (tags vN), aliases (tags), metrics.

    \b
    Examples:
      adapters push support my-team/support-lora            # the repo's next version, v3
      adapters remote list my-team --sort eval_loss
      adapters remote alias my-team/support-lora prod v3
      adapters pull my-team/support-lora:prod               # registers v3 here
    """


@remote.command(name="list")
@click.argument("org", metavar="ORG")
@click.option("--where", "where", multiple=True, metavar="COND",
              help="Metric condition as in `adapters list` (KEY OP NUMBER; rank and version work too).")
@click.option("--base", metavar="FINGERPRINT", help="Only versions on this base (fingerprint or its prefix).")
@click.option("--sort", metavar="KEY", help="Sort by a metric (ascending; '-key' for descending), name, "
              "version or rank. Default: by repo, then version.")
@click.option("--refresh", is_flag=True, help="Read every repo's tags from the Hub again instead of "
              "reusing those cached for an unchanged head (one more request per repo): sees tags made "
              "by other tools.")
@click.option("--calls", "show_calls", is_flag=True,
              help="Say on stderr how many Hub requests this made (listing pages, refs reads, downloads).")
@click.option("--token", metavar="T", help="Hub token for private repos (default: $HF_TOKEN).")
@json_option
@click.pass_context
def remote_list(ctx, org, where, base, sort, refresh, show_calls, token, as_json):
    """List every version of every adapterhub-local repo in ORG, with aliases and metrics.

    Repos are found by the tag our model cards carry (plain PEFT repos are left
    out); versions are the repos' vN tags, aliases their other tags; base
    fingerprint and metrics come from adapterhub.json at each version's commit,
    plus metrics logged later with `adapters log-metric --push`. All of it is
    what the Hub claims.

    adapterhub.json files are cached by commit id and each repo's tags by its
    head commit, which the listing carries: a second call on an unchanged
    namespace costs one listing request. Pushes and `adapters remote alias`
    commit before they tag, so every machine sees them. A tag made or moved by
    another tool (a raw create_tag) does not change the head: such a change to
    a repo already cached is seen only with --refresh.

    \b
    Examples:
      adapters remote list my-team
      adapters remote list my-team --where 'eval_loss<1.2' --sort eval_loss --json
      adapters remote list my-team --refresh --calls
    """
    from ..hub.listing import remote_list as do_list

    _quiet_hf()
    res = do_list(org, where=where, base=base, sort=sort, token=token, registry_home=ctx.obj.registry_home,
                  refresh=refresh)
    for p in res.problems:
        hint(f"skipped {p}")
    if show_calls:
        c = res.calls

        def n(k, word):
            return f"{c[k]} {word}{'' if c[k] == 1 else 's'}"
        hint(f"{n('total', 'Hub request')}: {n('listing_pages', 'listing page')}, {n('refs_reads', 'refs read')}, "
             f"{n('downloads', 'download')} of adapterhub.json")
    if as_json:
        emit_json(res.rows)
        return
    if not res.rows:
        hint(f"no adapterhub-local versions in {org}" + (" match" if where or base else ""))
        return
    keys: dict[str, int] = {}
    for r in res.rows:
        for k in r["metrics"]:
            keys[k] = keys.get(k, 0) + 1
    cols = sorted(keys, key=lambda k: (-keys[k], k))[:4]
    rows = []
    for r in res.rows:
        fp = (r["base_fingerprint"] or "-").split(":", 1)[-1][:12]
        row = {"repo": r["repo"], "version": r["tag"], "aliases": ",".join(r["aliases"]) or "-",
               "base": fp, "rank": r["rank"]}
        row.update({k: fmt(r["metrics"].get(k)) for k in cols})
        row["commit"] = r["commit_id"][:12]
        rows.append(row)
    echo(table(rows))


@remote.command(name="alias")
@click.argument("repo_id", metavar="ORG/NAME")
@click.argument("alias", metavar="ALIAS")
@click.argument("version", metavar="vN", required=False)
@click.option("--rm", "remove", is_flag=True, help="Remove the alias (no vN needed).")
@click.option("--token", metavar="T", help="Hub token (default: $HF_TOKEN).")
@json_option
@click.pass_context
def remote_alias(ctx, repo_id, alias, version, remove, token, as_json):
    """Point the Hub tag ALIAS of ORG/NAME at version vN's commit (moving it), or remove it.

    Names like v3 are reserved for versions. The move is also committed (the
    alias table in adapterhub.json at the head, not a new version), so every
    machine sees it at its next `adapters remote list`; `adapters pull
    ORG/NAME:ALIAS` registers the version it points at. When others move the
    same alias at the same moment, the last table committed wins.

    \b
    Examples:
      adapters remote alias my-team/support-lora prod v3
      adapters remote alias my-team/support-lora staging --rm
    """
    from ..hub.team import set_alias

    if not remove and not version:
        raise click.UsageError("give the version to point at, e.g. v3 (or --rm)")
    if remove and version:
        raise click.UsageError("--rm takes no version")
    _quiet_hf()
    res = set_alias(repo_id, alias, version, remove=remove, token=token, registry_home=ctx.obj.registry_home)
    if as_json:
        emit_json(res)
        return
    if remove:
        echo(f"removed {repo_id}:{alias}" + (f" (was {res['was']})" if res["was"] else ""))
    else:
        moved = f" (was {res['was']})" if res["was"] and res["was"] != res["version"] else ""
        echo(f"{repo_id}:{alias} -> {res['version']} (commit {(res['commit_id'] or '-')[:12]}){moved}")
    if res["now"] != (None if remove else res["version"]):
        hint(f"someone moved it again meanwhile: {repo_id}:{alias} is now {res['now'] or 'removed'}")


@click.command()
@click.argument("org", metavar="ORG")
@click.option("--weights", is_flag=True, help="Also download the weights of every version this registry lacks "
              "them for (as `adapters pull ORG/NAME@vN`; a metadata-only record is filled in, same ref).")
@click.option("--token", metavar="T", help="Hub token (default: $HF_TOKEN).")
@json_option
@click.pass_context
def sync(ctx, org, weights, token, as_json):
    """Bring the team namespace ORG into this registry, and say what is not on the Hub.

    Every version of ORG this registry lacks becomes a local record of its
    own (named after its repo, like `adapters pull`): metadata only, from
    the version's adapterhub.json (version vN, commit, base fingerprint,
    rank, targets, lineage, metrics as the repo's claims). `list` and `show`
    mark it; commands that need weights (export, merge, push, eval...) refuse
    it until `adapters pull ORG/NAME@vN` or `sync --weights` fills in its
    weights, checked against the hashes recorded. The team's aliases come
    along: a local alias is set when the name has none of that name, and
    moved or removed when the team moves or removes it, but only if sync set
    it; one set here with `adapters alias` stays (reported). A version commit
    a crashed push left untagged is tagged (when the token may write). A
    version that fails a check is named on stderr; the others come in.
    Running it again changes nothing.

    \b
    Examples:
      adapters sync my-team                 # metadata of every version, and aliases
      adapters sync my-team --weights       # the weights too
      adapters sync my-team --json | jq .metadata_only
    """
    from ..hub.sync import sync as do_sync

    _quiet_hf()
    res = do_sync(org, weights=weights, token=token, registry_home=ctx.obj.registry_home)
    if as_json:
        emit_json(res)
        return
    for p in res["problems"]:
        hint(f"skipped {p}")
    echo(f"{org}: {res['versions']} versions on the Hub, {len(res['missing'])} not in this registry")
    for r in res["repaired"]:
        echo(f"tagged {r} (a push had left it untagged)")
    for r in res["recorded"]:
        what = "(metadata only)" if r["is_new"] else "(the same files were here already)"
        echo(f"recorded {r['repo']}@{r['tag']} -> {r['ref']} {what}")
    for p in res["pulled"]:
        echo(f"pulled {p['repo']}@{p['tag']} -> {p['ref']}" + (" (weights filled in)" if p["filled"] else ""))
    for a in res["aliases_set"]:
        echo(f"alias {a}")
    for a in res["aliases_removed"]:
        echo(f"alias removed {a}")
    for a in res["aliases_kept"]:
        echo(f"alias {a}")
    if res["metadata_only"]:
        n = len(res["metadata_only"])
        hint(f"{n} version{'s' if n > 1 else ''} here without weights (metadata only); `adapters sync {org} "
             "--weights` downloads them, `adapters pull ORG/NAME@vN` one")
    if res["not_on_hub"]:
        echo(table([[r] for r in res["not_on_hub"]], [f"local, not pushed to {org}"]))


COMMANDS = [remote, sync]
