"""Reading a text file a user named (labels, prompts, dataset listings): the text, or one line saying why not."""

from __future__ import annotations

from pathlib import Path

from clipworks.display import quote_path
from clipworks.errors import ClipworksError, UsageError


def read_user_text(path: str | Path, what: str, error: type[ClipworksError] = UsageError) -> str:
    """The file's UTF-8 text (a byte-order mark is dropped, as editors on Windows write one); else ``error``
    naming the file, what it should be (``what``: "a label file", "a JSON file") and what to do."""
    path = Path(path)
    name = quote_path(str(path))
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as e:
        raise error(f"{name}: no such file; check the path") from e
    except IsADirectoryError as e:
        raise error(f"{name}: is a folder, not {what}; pass the file inside it") from e
    except UnicodeDecodeError as e:
        raise error(f"{name}: not UTF-8 text; save {what} as UTF-8") from e
    except OSError as e:
        raise error(f"{name}: cannot read it ({e.strerror or e}); check its permissions") from e
