"""The CLI reference page (docs/cli.md), generated from the click commands themselves.

`make cli-docs` rewrites the page; tests/test_docs.py fails when the committed page is
stale, so the reference can never drift from `adapters COMMAND --help`.

    python -m adapterhub_local.cli.reference > docs/cli.md
"""

from __future__ import annotations

import inspect
import sys

import click

HEADER = """# CLI reference

Generated from the commands themselves by `make cli-docs`
(`python -m adapterhub_local.cli.reference`); a test fails when this page is stale.
Every command takes `-h/--help`; the global options go before the verb:
`adapters [--registry PATH] [--debug] COMMAND ...`.
"""


def _walk(group: click.Group, prefix: str):
    ctx = click.Context(group, info_name=prefix)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        path = f"{prefix} {name}"
        yield path, cmd
        if isinstance(cmd, click.Group):
            yield from _walk(cmd, path)


def _usage(path: str, cmd: click.Command) -> str:
    ctx = click.Context(cmd, info_name=path)
    pieces = cmd.collect_usage_pieces(ctx)
    return " ".join([path, *pieces])


def _option_row(param: click.Option) -> list[str]:
    names = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
    if param.is_flag:
        kind = "flag"
    elif param.metavar:
        kind = param.metavar
    elif isinstance(param.type, click.Choice):
        kind = " | ".join(param.type.choices)
    else:
        kind = param.type.name.upper()
    default = ""
    if param.show_default or (param.default not in (None, False, (), "") and not param.is_flag):
        d = param.default
        if not callable(d) and d not in (None, (), "") and not repr(d).startswith("Sentinel"):
            default = f"`{d}`"
    text = " ".join((param.help or "").split()).replace("|", "\\|")
    return [names, kind.replace("|", "\\|"), default, text]


def command_section(path: str, cmd: click.Command) -> str:
    lines = [f"## `{path}`", ""]
    lines += ["```text", _usage(path, cmd), "```", ""]
    help_text = inspect.cleandoc(cmd.help or "")
    # click's \b marks a paragraph it must not rewrap: render those paragraphs verbatim
    for para in help_text.split("\n\n"):
        if para.startswith("\b\n"):
            lines += ["```text", para[2:], "```", ""]
        else:
            lines += [" ".join(para.split()), ""]
    args = [p for p in cmd.params if isinstance(p, click.Argument)]
    if args:
        lines.append("Arguments: " + ", ".join(
            f"`{p.human_readable_name}`" + (" (one or more)" if p.nargs == -1 else "") for p in args) + ".")
        lines.append("")
    opts = [p for p in cmd.params if isinstance(p, click.Option) and not p.hidden]
    if opts:
        lines += ["| option | value | default | what it does |", "|---|---|---|---|"]
        for p in opts:
            lines.append("| " + " | ".join(_option_row(p)) + " |")
        lines.append("")
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd, info_name=path)
        lines += ["Subcommands: " + ", ".join(f"`{path} {n}`" for n in cmd.list_commands(ctx)) + ".", ""]
    return "\n".join(lines)


def render() -> str:
    from . import cli

    parts = [HEADER]
    for path, cmd in _walk(cli, "adapters"):
        parts.append(command_section(path, cmd))
    return "\n".join(parts).rstrip() + "\n"


def commands() -> list[tuple[str, click.Command]]:
    """Every command path (`adapters merge`, `adapters remote list`, ...) and its command."""
    from . import cli

    return list(_walk(cli, "adapters"))


if __name__ == "__main__":
    sys.stdout.write(render())
