"""File names as text: kept byte for byte, and printed so that one name is always one line.

A POSIX file name is bytes, not text: ``os.scandir`` hands back names that are not UTF-8 as ``str`` with
lone surrogates (Python's ``surrogateescape``), and ``os.fsencode`` turns them back into the exact bytes.
``to_bytes`` and ``from_bytes`` are that pair, fixed to UTF-8 so that a file written on one machine reads
the same on another whatever its locale.

Text output (search results, duplicate groups, ``index status``) prints each name through ``quote_name``,
in the spirit of ``ls --quoting-style=shell-escape``: a printable name prints unchanged; any other name
(a newline, tab or other control character, bytes that are not UTF-8, an invisible format character such
as U+202E RIGHT-TO-LEFT OVERRIDE, or one that itself starts with ``$'``) prints as a single bash ANSI-C
string ``$'...'``, in which every such character is written as its bytes ``\\xHH`` (``\\n``, ``\\t`` and
``\\r`` by name). Pasted into bash, that string is the file's exact name, whatever the locale. JSON output
needs no quoting: ``json.dumps`` escapes control characters and writes undecodable bytes as ``\\udcHH``,
which ``os.fsencode(json.loads(...))`` turns back into the bytes.
"""

from __future__ import annotations

ENCODING = "utf-8"
ERRORS = "surrogateescape"
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\", "'": "\\'"}


def to_bytes(name: str) -> bytes:
    """The bytes of a name as the file system holds them (undecodable bytes come back exactly)."""
    return name.encode(ENCODING, ERRORS)


def from_bytes(data: bytes) -> str:
    """The ``str`` Python's own file functions use for these bytes (the inverse of ``to_bytes``)."""
    return data.decode(ENCODING, ERRORS)


def needs_quoting(name: str) -> bool:
    return not name.isprintable() or name.startswith("$'")


def quote_name(name: str) -> str:
    """``name`` on one line: unchanged when printable, else a bash ``$'...'`` string of its exact bytes."""
    if not needs_quoting(name):
        return name
    out = []
    for char in name:
        if char in _NAMED:
            out.append(_NAMED[char])
        elif char.isprintable():
            out.append(char)
        else:
            out.append("".join(f"\\x{b:02x}" for b in to_bytes(char)))
    return "$'" + "".join(out) + "'"
