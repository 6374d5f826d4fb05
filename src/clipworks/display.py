"""File names and messages as text lines: lossless, and never more than one line each.

A POSIX file name is bytes: it may hold a newline, a tab or bytes that are not UTF-8 (Python carries
those as lone surrogates, ``os.fsdecode``). Printed raw, a newline splits one name over two lines and a
surrogate crashes a UTF-8 stdout. ``quote_path`` leaves printable names alone and writes any other (a
control character, bytes that are not UTF-8, an invisible format character such as U+202E RIGHT-TO-LEFT
OVERRIDE, or a name that itself starts with ``$'``) as one bash ``$'...'`` string, in the spirit of
``ls --quoting-style=shell-escape``: each such character as its UTF-8 bytes ``\\xHH`` (``\\n``, ``\\t``,
``\\r`` by name), so that pasted into bash, in any locale, it is the file's exact name. JSON output needs
none of this: ``json.dumps`` escapes control characters and writes undecodable bytes as ``\\udcXX``,
which ``os.fsencode(json.loads(...))`` turns back into the bytes.
"""

from __future__ import annotations

import os

_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\", "'": "\\'"}


def _escaped(text: str, named: dict[str, str]) -> str:
    out = []
    for char in text:
        if char in named:
            out.append(named[char])
        elif char.isprintable():
            out.append(char)
        else:  # a lone surrogate is the one byte it stands for; any other character, its UTF-8 bytes
            out.append("".join(f"\\x{b:02x}" for b in os.fsencode(char)))
    return "".join(out)


def quote_path(path: str | os.PathLike[str]) -> str:
    """``path`` unchanged when it is printable, else a bash ``$'...'`` string of its exact bytes."""
    text = os.fsdecode(path)
    if text.isprintable() and not text.startswith("$'"):
        return text
    return "$'" + _escaped(text, _NAMED) + "'"


def one_line(message: str) -> str:
    """``message`` with newlines, other control characters and undecodable bytes written as escapes."""
    if message.isprintable():
        return message
    return _escaped(message, {c: e for c, e in _NAMED.items() if c in "\n\t\r"})


def clock(seconds: float, *, decimals: int = 1, hour_digits: int = 2) -> str:
    """A position in a video the way players show it: ``00:01:23.4`` (``decimals`` digits of seconds)."""
    scale = 10**decimals
    units = round(seconds * scale)
    hours, rest = divmod(units, 3600 * scale)
    minutes, rest = divmod(rest, 60 * scale)
    width = 3 + decimals if decimals else 2
    return f"{hours:0{hour_digits}d}:{minutes:02d}:{rest / scale:0{width}.{decimals}f}"
