"""Who may use a web server the CLI starts (``serve`` and ``stream --web``): the API key and the allowed hosts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clipworks import settings as env
from clipworks.errors import UsageError
from clipworks.webguard import check_key, read_key_file

ApiKeyOpt = Annotated[
    str | None,
    typer.Option(
        help="Require this key (Authorization: Bearer KEY, or a browser login) on every route but /healthz. "
        "Visible to `ps`: prefer CLIPWORKS_API_KEY or --api-key-file.",
    ),
]
ApiKeyFileOpt = Annotated[
    Path | None,
    typer.Option(help="Read the API key from the first line of this file (kept out of `ps`, unlike --api-key)."),
]
AllowedHostOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--allowed-host",
        help="Another host name the server answers to (repeatable; '*' for any, behind a proxy that checks Host). "
        "IP addresses, localhost and this machine's name are always answered.",
    ),
]


def api_key(value: str | None, key_file: Path | None) -> str | None:
    """The key from ``--api-key``, ``--api-key-file`` or ``CLIPWORKS_API_KEY``, in that order; None: no key."""
    if value is not None and key_file is not None:
        raise UsageError("give --api-key or --api-key-file, not both")
    if key_file is not None:
        return read_key_file(key_file)
    if value is not None:
        return check_key(value, "--api-key")
    from_env = env.api_key()
    return check_key(from_env, "CLIPWORKS_API_KEY") if from_env is not None else None


def allowed_hosts(bind: str, extra: list[str] | None) -> tuple[str, ...]:
    """The bound host and the ``--allowed-host`` names."""
    for name in extra or ():
        if not name.strip() or "/" in name:
            raise UsageError(f"--allowed-host {name!r}: give a host name such as photos.example.org, no URL")
    return (bind, *(extra or ()))
