"""Entry point: builds the command tree and turns errors into one line and an exit code.

Typer (0.26 and later) vendors its own copy of Click, so what it raises are ``typer`` exceptions
(``typer.TyperException`` with an ``exit_code``, ``typer.Exit``, ``typer.Abort``), never the separate
``click`` package's: those are what :func:`main` catches. A usage error prints exactly one line on stderr,
``error: <what is wrong, naming the option> (see: clipworks CMD --help)``, and exits 2; a bare command
group prints its help on stdout and that one line, so ``clipworks | less`` still shows the commands.
"""

from __future__ import annotations

import sys
from typing import Any

import typer

from clipworks import __version__
from clipworks.cli import bench, classify, embed, export, index, models, search, serve, stream, video
from clipworks.cli.common import error_line
from clipworks.display import one_line
from clipworks.errors import ClipworksError

app = typer.Typer(
    name="clipworks",
    help="CLIP on ONNX Runtime: embeddings, photo search, tagging service, video features, live streams.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help wraps option names and their help at any width; Rich's tables cut long option names off
    # ("--disable-runtime…") at 80 columns.
    rich_markup_mode=None,
)
app.add_typer(embed.app, name="embed")
app.add_typer(models.app, name="models")
app.command("export")(export.export)
app.add_typer(index.app, name="index")
app.command("search", context_settings=search.QUERY_CONTEXT)(search.search)
app.command("similar")(search.similar)
app.command("duplicates")(search.duplicates)
app.command("classify")(classify.classify)
app.command("interrogate")(classify.interrogate)
app.command("serve")(serve.serve)
app.add_typer(video.app, name="video")
app.command("stream")(stream.stream)
app.command("bench")(bench.bench)


def _version(value: bool) -> None:
    if value:
        print(f"clipworks {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """clipworks: run CLIP fast on ordinary machines and accelerators."""


# What help shows after an option instead of Typer's Python types (<list[Path]>, <str>).
METAVARS = {"Path": "PATH", "str": "TEXT", "int": "INTEGER", "float": "NUMBER"}


def _no_type(ctx: Any) -> None:
    return None


def _readable_metavars(command: Any) -> None:
    """Give every option and argument of the tree a metavar such as PATH or TEXT, unless it names its own."""
    for param in getattr(command, "params", []):
        if param.metavar is not None or getattr(param, "is_flag", False):
            continue
        base = param.bare_type().removeprefix("list[").removesuffix("]")
        if getattr(param, "param_type_name", "") == "argument":
            # Typer prints an argument's Python type after its name ("VIDEOS <list[Path]>"); the upper-case
            # name and the help say what to pass.
            param.display_type_rich = _no_type
            param.metavar = param.name.upper()
        elif base in METAVARS:
            param.metavar = METAVARS[base]
    for sub in getattr(command, "commands", {}).values():
        _readable_metavars(sub)


def build_command() -> Any:
    command = typer.main.get_command(app)
    _readable_metavars(command)
    return command


def _usage_line(e: typer.TyperException) -> str:
    ctx = getattr(e, "ctx", None)
    hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
    return f"error: {one_line(e.format_message())}{hint}"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print ``error: ...`` on one line and exit non-zero, never a traceback."""
    command = build_command()
    try:
        result = command.main(args=argv, prog_name="clipworks", standalone_mode=False)
    except ClipworksError as e:
        print(f"error: {one_line(error_line(e, command, sys.argv[1:] if argv is None else argv))}", file=sys.stderr)
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except (KeyboardInterrupt, typer.Abort):
        print("interrupted", file=sys.stderr)
        return 130
    except typer.TyperException as e:
        ctx = getattr(e, "ctx", None)
        if ctx is not None and e.format_message() == ctx.get_help():  # a group given no command
            print(e.format_message())
            print(f"error: {ctx.command_path} needs a command (listed above)", file=sys.stderr)
        else:
            print(_usage_line(e), file=sys.stderr)
        return e.exit_code
    # Typer turns Ctrl-C into Exit(130), which it *returns* (not raises) when standalone_mode is off.
    return result if isinstance(result, int) else 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
