"""Output helpers: data to stdout (tables or --json), hints to stderr.

Every string that reaches a terminal passes :func:`safe_text` first: names, paths and
values come from files and servers we did not write, and a raw ESC, C1 or bidi control
in them could rewrite the screen, hide text or forge output. ``--json`` needs nothing
more: ``json.dumps`` (``ensure_ascii``) escapes every control and non-ASCII character.
"""

from __future__ import annotations

import json
import math

import click

from ..progress import human_bytes  # noqa: F401 - lives below cli, for card.py
from ..terminal import safe_text


def echo(text="", err: bool = False) -> None:
    """click.echo of text that may carry strings from files or servers (newlines kept)."""
    click.echo(safe_text(text, one_line=False), err=err)


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=_default, allow_nan=False))


def _default(o):
    from pathlib import Path

    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or math.isnan(value) or math.isinf(value):
            return str(value)
        if 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    if isinstance(value, (list, tuple)):
        return ",".join(fmt(v) for v in value)
    return safe_text(value)


def table(rows: list[dict] | list[list], headers: list[str] | None = None) -> str:
    """A plain aligned text table."""
    if rows and isinstance(rows[0], dict):
        headers = headers or list(rows[0].keys())
        body = [[fmt(r.get(h)) for h in headers] for r in rows]
    else:
        body = [[fmt(c) for c in r] for r in rows]
    headers = headers or []
    widths = [len(safe_text(h)) for h in headers]
    for r in body:
        for i, c in enumerate(r):
            if i >= len(widths):
                widths.append(0)
            widths[i] = max(widths[i], len(c))
    lines = []
    if headers:
        lines.append("  ".join(safe_text(h).upper().ljust(w) for h, w in zip(headers, widths)).rstrip())
    for r in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def hint(message: str) -> None:
    echo(message, err=True)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(f)
