"""Terminal safety: strings from files and servers are escaped before they are printed.

A name, path or value read from an adapter, a model folder, a registry or a Hub may hold
ESC sequences (rewrite the screen, set the window title, fake output), C1 controls, or
bidi overrides that display text in another order than it is stored. Everything printed
for a person goes through :func:`safe_text`; ``--json`` output needs nothing more, since
``json.dumps`` (``ensure_ascii``) escapes every control and non-ASCII character.
"""

from __future__ import annotations

import re

# C0 (tab and newline handled separately), DEL, C1, and the Unicode controls that reorder or
# break lines: bidi embeddings/overrides/isolates and marks, line and paragraph separators.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029"
                     "\u202a-\u202e\u2066-\u2069]")
_UNSAFE_LINE = re.compile(_UNSAFE.pattern[:-1] + "\t\n]")


def _escape(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def safe_text(text, one_line: bool = True) -> str:
    """``text`` with every terminal control escaped as ``\\x1b`` / ``\\u202e``; with
    ``one_line`` tabs and newlines too (a table cell or an error stays one line)."""
    return (_UNSAFE_LINE if one_line else _UNSAFE).sub(_escape, str(text))
