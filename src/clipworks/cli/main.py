"""Entry point: builds the command tree and turns errors into one line and an exit code."""

from __future__ import annotations

import sys

import click
import typer

from clipworks import __version__
from clipworks.cli import classify, embed, export, index, models, search, serve, stream, video
from clipworks.errors import ClipworksError

app = typer.Typer(
    name="clipworks",
    help="CLIP on ONNX Runtime: embeddings, photo search, tagging service, video features, live streams.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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


def _version(value: bool) -> None:
    if value:
        print(f"clipworks {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """clipworks: run CLIP fast on ordinary machines and accelerators."""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print ``error: ...`` on one line and exit non-zero, never a traceback."""
    try:
        result = app(args=argv, prog_name="clipworks", standalone_mode=False)
    except ClipworksError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        print("interrupted", file=sys.stderr)
        return 130
    # Typer turns Ctrl-C into Exit(130), which click *returns* (not raises) when standalone_mode is off.
    return result if isinstance(result, int) else 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
