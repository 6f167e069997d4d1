"""`adapters`: one click group; each area adds its verbs from its own module.

Command modules import only click and the standard library at the top, so
`adapters --help` and `adapters list` start fast; torch, transformers and
huggingface_hub are imported inside the commands that need them.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from .. import __version__
from ..errors import AdapterHubError
from .context import AppContext

# Each module exposes COMMANDS: a list of click commands.
COMMAND_MODULES = ["core_cmds", "train_cmds", "registry_cmds", "merge_cmds", "hub_cmds", "remote_cmds", "serve_cmds",
                   "demo_cmds", "eval_cmds"]

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Group(click.Group):
    def list_commands(self, ctx):
        return list(self.commands)  # keep the order we registered: the story order


@click.group(cls=Group, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="adapters")
@click.option("--registry", "registry", metavar="PATH", type=click.Path(file_okay=False),
              help="Registry home (holds registry.db and blobs/). Default: $ADAPTERS_HOME, "
              "else ~/.local/share/adapterhub-local.")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, registry: str | None, debug: bool) -> None:
    """Train, version, merge and publish LoRA adapters.

    \b
    A typical day:
      adapters train ./base --data chat.jsonl --name support   # a new adapter, registered
      adapters list --where 'eval_loss<1.2'                    # what do we have?
      adapters merge ./base support:prod --out ./merged        # W' = W + s·B·A, streamed
      adapters push ./merged me/support-merged                 # publish with a model card

    References (REF) are `name` (latest), `name@3`, `name:prod`, or a PEFT folder path.
    Every command takes -h for its own help; commands that read take --json.
    """
    ctx.obj = AppContext(registry_path=registry, debug=debug or ctx.obj is not None and ctx.obj.debug)


for _mod in COMMAND_MODULES:
    for _cmd in importlib.import_module(f"{__name__}.{_mod}").COMMANDS:
        if _cmd.name in cli.commands:
            raise RuntimeError(f"duplicate command {_cmd.name}")
        cli.add_command(_cmd)


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so every cleanup path (temp dirs,
    ``.partial`` outputs) runs; not a KeyboardInterrupt, so click prints nothing of its own."""


def _on_sigterm(signum, frame):
    raise Terminated


def _catch_sigterm() -> None:
    import signal

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # leave a handler someone else set alone
        signal.signal(signal.SIGTERM, _on_sigterm)


def _interrupted(e: BaseException) -> None:
    term = isinstance(e, Terminated)
    click.echo(f"error: {'terminated' if term else 'interrupted'}; nothing half-written was left behind",
               err=True)
    sys.exit(143 if term else 130)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: turns known errors into one line and exit 1.

    Every message that may carry a name or path from a file or a server is escaped
    (``output.safe_text``) before it reaches the terminal.
    """
    from .output import safe_text

    args = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("ADAPTERS_DEBUG") == "1"
    if "--debug" in args:  # accepted anywhere on the line, not only before the verb
        args.remove("--debug")
        debug = True
    _catch_sigterm()
    try:
        cli.main(args=args, prog_name="adapters", standalone_mode=False,
                 obj=AppContext(registry_path=None, debug=debug))
    except click.exceptions.Abort as e:
        # click turns Ctrl-C into Abort (after echoing a newline); a refused prompt is one too
        if isinstance(e.__cause__, KeyboardInterrupt):
            if debug:
                raise e.__cause__ from None
            _interrupted(e.__cause__)
        click.echo("error: aborted; nothing was changed", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.message = safe_text(e.message, one_line=False)
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, Terminated) as e:
        if debug:
            raise
        _interrupted(e)
    except AdapterHubError as e:
        if debug:
            raise
        click.echo(f"error: {safe_text(e)}", err=True)
        sys.exit(e.exit_code)
    except BrokenPipeError:
        sys.exit(0)
