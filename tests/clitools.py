"""Running the console entry point the way a user does, and checking its one-line errors."""

from __future__ import annotations

from adapterhub_local.cli import main


def run(args, capsys):
    """``adapters ARGS`` through ``main``, as the console script runs it: (code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    got = capsys.readouterr()
    return code, got.out, got.err


def exit_code(args) -> int:
    """``adapters ARGS`` through ``main`` (arguments str()-ed); only its exit status."""
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


def one_line_error(res, *words):
    """Exit 1, nothing on stdout, one ``error: ...`` line on stderr holding every word."""
    code, out, err = res
    assert code == 1 and out == "", (code, out, err)
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])
