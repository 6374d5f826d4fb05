"""File names and messages as text lines: lossless, and never more than one line each.

A POSIX file name is bytes: it may hold a newline, a tab or bytes that are not UTF-8 (Python carries
those as lone surrogates, ``os.fsdecode``). Printed raw, a newline splits one name over two lines and a
surrogate crashes a UTF-8 stdout. :func:`quote_path` leaves ordinary names alone and writes the others
in bash's ``$'...'`` quoting, as ``ls`` does, so every byte survives and the result pastes into a shell.
"""

from __future__ import annotations

import os

_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\", "'": "\\'"}
_SURROGATES = range(0xDC80, 0xDD00)  # os.fsdecode's stand-ins for the bytes 0x80..0xFF that are not UTF-8


def _escape(char: str, quoted: bool) -> str:
    code = ord(char)
    if code in _SURROGATES:
        return f"\\x{code - 0xDC00:02x}"
    if quoted and char in _ESCAPES:
        return _ESCAPES[char]
    if char.isprintable():
        return char
    if char in _ESCAPES:
        return _ESCAPES[char]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def quote_path(path: str | os.PathLike[str]) -> str:
    """``path`` unchanged when it is printable text, else ``$'...'`` with escapes (``$'a\\nb.jpg'``)."""
    text = os.fsdecode(path)
    if text.isprintable():
        return text
    return "$'" + "".join(_escape(c, quoted=True) for c in text) + "'"


def one_line(message: str) -> str:
    """``message`` with newlines, other control characters and undecodable bytes written as escapes."""
    if message.isprintable():
        return message
    return "".join(_escape(c, quoted=False) for c in message)
