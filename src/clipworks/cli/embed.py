"""``clipworks embed images|texts``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from clipworks.cli.common import (
    MODEL_DEFAULT,
    DeviceOpt,
    ModelOpt,
    PrecisionOpt,
    ThreadsOpt,
    info,
    load_model,
)
from clipworks.display import quote_path
from clipworks.errors import ClipworksError, UsageError

DEFAULT_TEXTS_FILE = "text_embeddings.json"  # Hailo's text_image_matcher writes this name

app = typer.Typer(help="Embed images into a file, or texts into a prompt JSON file.", no_args_is_help=True)


@app.command()
def images(
    inputs: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="OUT.pkl (Sophgo format), OUT.npy or OUT.parquet.")],
    model: ModelOpt = MODEL_DEFAULT,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per inference call.")] = 32,
    workers: Annotated[int | None, typer.Option(help="Decoder threads (default: cores, at most 8).")] = None,
    queue_size: Annotated[int | None, typer.Option(help="Decoded images held ahead of the encoder.")] = None,
    preprocess: Annotated[
        str, typer.Option(help="exact (open_clip's transform) or fast (reduced JPEG decode).")
    ] = "exact",
    threads: ThreadsOpt = None,
) -> None:
    """Embed folders of images (L2-normalised float32) into one file, skipping unreadable files."""
    from clipworks.outputs import check_output_path, write_embeddings
    from clipworks.pipeline import collect_image_files, embed_files

    if preprocess not in ("exact", "fast"):
        raise UsageError(f"--preprocess must be exact or fast, not {preprocess!r}")
    out = check_output_path(output)
    files = collect_image_files(inputs)
    clip = load_model(model, device, precision, threads, preprocess)
    info(f"{clip.name}: {len(files)} images, {clip.precision} on {clip.providers[0]}")
    result = embed_files(clip, files, batch_size=batch_size, workers=workers, queue_size=queue_size)
    if not result.paths:
        raise ClipworksError(f"none of the {len(files)} files could be read as an image; nothing written to {out}")
    written = write_embeddings(out, result.paths, result.embeddings)
    info(result.summary())
    info("wrote " + ", ".join(quote_path(p) for p in written))


def _read_interactive() -> tuple[list[str], list[str]]:
    """Hailo's --interactive: one prompt a line until an empty line; a leading '-' marks a negative."""
    positive: list[str] = []
    negative: list[str] = []
    prompt = sys.stdin.isatty()
    while True:
        if prompt:
            print("text (empty line to finish, '-text' for a negative): ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        text = line.strip()
        if not text:
            break
        (negative if text.startswith("-") else positive).append(text.lstrip("-").strip())
    return positive, negative


@app.command()
def texts(
    text: Annotated[list[str] | None, typer.Argument(help="Prompts to encode.")] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help=f"Hailo-format JSON file to write (default: {DEFAULT_TEXTS_FILE}; with --image-path, none).",
            show_default=False,
        ),
    ] = None,
    negative: Annotated[
        list[str] | None, typer.Option("--negative", "-n", help="Negative prompt (repeatable).")
    ] = None,
    texts_json: Annotated[
        Path | None, typer.Option(help='A {"positive": [...], "negative": [...]} file (Hailo --texts-json).')
    ] = None,
    interactive: Annotated[bool, typer.Option(help="Read prompts from standard input, one a line.")] = False,
    image_path: Annotated[Path | None, typer.Option(help="Also print how this image matches the prompts.")] = None,
    threshold: Annotated[float, typer.Option(help="Probability a match must exceed.")] = 0.8,
    prefix: Annotated[str, typer.Option(help="Prefix of every non-ensemble prompt.")] = "A photo of a ",
    ensemble: Annotated[bool, typer.Option(help="Average each prompt over Hailo's ensemble templates.")] = False,
    model: ModelOpt = MODEL_DEFAULT,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
) -> None:
    """Encode prompts into the text-embedding JSON of Hailo's CLIP app (the text_image_matcher tool)."""
    from clipworks.prompts import PromptSet, encode_entries, match

    sources = sum(bool(x) for x in (text, texts_json, interactive))
    if sources != 1:
        raise UsageError("give prompts as arguments, or --texts-json FILE, or --interactive (exactly one of them)")
    if not 0.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold must be between 0 and 1, not {threshold}")
    options = {"threshold": threshold, "text_prefix": prefix, "ensemble": ensemble}
    if texts_json:
        prompt_set = PromptSet.from_texts_json(texts_json, **options)
    else:
        positive, negatives = _read_interactive() if interactive else (list(text or []), [])
        negatives += list(negative or [])
        if not positive and not negatives:
            raise UsageError("no prompts given")
        prompt_set = PromptSet.from_texts(positive, negatives, **options)
    clip = load_model(model, device, precision)
    encode_entries(prompt_set, clip.encode_texts)
    if output is None and image_path is not None:
        # A look at how one image matches must not replace a prompt file made earlier.
        info(f"prompts not saved (pass -o FILE to save them, e.g. -o {DEFAULT_TEXTS_FILE})")
    else:
        target = output or Path(DEFAULT_TEXTS_FILE)
        replaced = " (replaced the previous file)" if target.exists() else ""
        saved = prompt_set.save(target)
        prompts = len(prompt_set.active_indices())
        info(f"wrote {quote_path(saved)}{replaced} ({prompts} prompts, {clip.embed_dim}-d, {clip.name})")
    if image_path is not None:
        result = match(clip.encode_images([image_path]), prompt_set)[0]
        for index, probability in sorted(result.probabilities.items(), key=lambda kv: -kv[1]):
            entry = prompt_set.entries[index]
            tag = " (negative)" if entry.negative else ""
            print(f"{probability:.3f}  {entry.text}{tag}")
        verdict = "passed" if result.passed else "did not pass"
        print(f"best: {result.text} ({result.probability:.3f}) {verdict} the threshold {prompt_set.threshold}")
