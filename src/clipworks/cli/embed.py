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
    PromptFileModelOpt,
    ThreadsOpt,
    check_preprocess,
    greedy_list_command,
    info,
    load_model,
)
from clipworks.display import quote_path
from clipworks.errors import ClipworksError, UsageError
from clipworks.settings import default_model

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
    """Embed folders of images (L2-normalised float32) into one file, skipping unreadable files.

    .npy and .parquet are written as the batches come (memory holds the file names, not the vectors);
    .pkl is one pickled dict by its format, so it holds every vector until the end.
    """
    from clipworks.outputs import EmbeddingWriter, check_output_path
    from clipworks.pipeline import collect_image_files, embed_files

    check_preprocess(preprocess)
    out = check_output_path(output)
    files = collect_image_files(inputs)
    clip = load_model(model, device, precision, threads, preprocess)
    info(f"{clip.name}: {len(files)} images, {clip.precision} on {clip.providers[0]}")
    with EmbeddingWriter(out, clip.embed_dim) as writer:
        result = embed_files(clip, files, batch_size=batch_size, workers=workers, queue_size=queue_size,
                             on_batch=lambda batch: writer.add(batch.paths, batch.embeddings))  # fmt: skip
        if not result.count:
            raise ClipworksError(f"none of the {len(files)} files could be read as an image; nothing written to {out}")
        written = writer.close()
    info(result.summary())
    info("wrote " + ", ".join(quote_path(p) for p in written))


ENGINES = ("local", "ray")


@app.command()
def dataset(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="WebDataset tars (brace patterns: 'shards/{00000..00123}.tar'), Parquet/CSV tables of image "
            "paths or URLs, or folders; fsspec URLs (s3://, gs://) work where installed."
        ),
    ],
    output_folder: Annotated[
        Path, typer.Option("--output-folder", help="Gets img_emb/, text_emb/, metadata/ (clip-retrieval's layout).")
    ],
    input_format: Annotated[
        str | None, typer.Option(help="files, webdataset, parquet or csv (default: from the first input's name).")
    ] = None,
    enable_text: Annotated[bool, typer.Option("--enable-text", help="Also embed each sample's caption.")] = False,
    engine: Annotated[
        str, typer.Option(help="local: this process; ray: a Ray cluster (pip install 'clipworks[ray]').")
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(help="--engine ray: the cluster to join (auto, or ray://HOST:10001); default: start Ray here."),
    ] = None,
    actors: Annotated[
        int | None, typer.Option(help="--engine ray: model actors (default: one per GPU share, else per machine).")
    ] = None,
    gpus_per_actor: Annotated[
        float, typer.Option(help="--engine ray: each model actor's share of a GPU (0.5: two a GPU; 0: CPU).")
    ] = 0.0,
    shard_size: Annotated[int, typer.Option(help="Samples per output shard.")] = 100_000,
    image_column: Annotated[str | None, typer.Option(help="Table column of the image path or URL.")] = None,
    caption_column: Annotated[str | None, typer.Option(help="Table column of the caption.")] = None,
    retry_failed: Annotated[
        bool,
        typer.Option(
            "--retry-failed",
            help="Resuming: embed again the finished shards that have failed samples (URLs that timed out, files "
            "since fixed); the others are kept.",
        ),
    ] = False,
    model: ModelOpt = MODEL_DEFAULT,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per inference call.")] = 32,
    workers: Annotated[int | None, typer.Option(help="Decoder threads (default: cores, at most 8).")] = None,
    threads: ThreadsOpt = None,
) -> None:
    """Embed a dataset shard by shard into clip-retrieval's layout (autofaiss reads it); resumable."""
    from tqdm import tqdm

    from clipworks.dataset import check_shard_size, embed_dataset, resolve_inputs

    if engine not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine != "ray" and (address is not None or actors is not None or gpus_per_actor):
        raise UsageError("--address, --actors and --gpus-per-actor are for --engine ray")
    check_shard_size(shard_size)
    paths, fmt = resolve_inputs(inputs, input_format)
    options = {"image_column": image_column, "caption_column": caption_column, "retry_failed": retry_failed}
    with tqdm(unit="img", disable=not sys.stderr.isatty(), dynamic_ncols=True) as bar:
        if engine == "ray":
            from clipworks.dataset_ray import ModelRecipe, RaySettings, embed_dataset_ray

            # The workers load the model themselves: a bundle folder by its full path (their working folder
            # is not this one), a registry name as given (each machine pulls it).
            local_dir = Path(model).expanduser()
            recipe = ModelRecipe(str(local_dir.resolve()) if local_dir.is_dir() else model, device, precision,
                                 threads)  # fmt: skip
            info(f"{model}: {len(paths)} {fmt} input(s) on Ray ({address or 'started here'})")
            result = embed_dataset_ray(
                recipe, paths, fmt, output_folder, settings=RaySettings(address, actors, gpus_per_actor),
                enable_text=enable_text, shard_size=shard_size, batch_size=batch_size, on_progress=bar.update,
                **options,
            )  # fmt: skip
        else:
            clip = load_model(model, device, precision, threads)
            info(f"{clip.name}: {len(paths)} {fmt} input(s), {clip.precision} on {clip.providers[0]}")
            result = embed_dataset(
                clip, paths, fmt, output_folder, enable_text=enable_text, shard_size=shard_size,
                batch_size=batch_size, workers=workers, on_progress=bar.update, **options,
            )  # fmt: skip
    info(result.summary())
    info(f"wrote {quote_path(output_folder)}")
    if (nothing := result.nothing_embedded()) is not None:
        raise ClipworksError(nothing)  # a non-zero exit: a script must not take the job for done


def _read_lines(hailo: bool, prefix: str) -> tuple[list[str], list[str]]:
    """Prompts from standard input, one a line, until an empty line.

    ``hailo``: Hailo's ``--interactive``, the first text is the positive and the others are negatives.
    Otherwise (``--stdin``) every text is a positive unless it starts with '-'.
    """
    lines: list[str] = []
    ask = sys.stdin.isatty()
    hint = (
        f"Enter text (leave empty to finish) {prefix}: "
        if hailo
        else "text (empty line to finish, '-text' for a negative): "
    )
    while True:
        if ask:
            print(hint, end="", file=sys.stderr, flush=True)
        text = sys.stdin.readline().strip()
        if not text:
            break
        lines.append(text)
    if hailo:
        return lines[:1], lines[1:]
    positive = [t for t in lines if not t.startswith("-")]
    return positive, [t.lstrip("-").strip() for t in lines if t.startswith("-")]


def _existing_prompt_file(target: Path, append: bool):  # type: ignore[no-untyped-def]
    """The prompt file already at ``target``, or None. It must be one when appending to it; otherwise a
    file that is not one is simply replaced, as before."""
    from clipworks.errors import BadPromptFile
    from clipworks.prompts import PromptSet

    if not target.exists():
        if append:
            raise UsageError(f"--append {target}: no such file; drop --append to create it")
        return None
    try:
        return PromptSet.load(target)
    except BadPromptFile:
        if append:
            raise
        return None


def _model_reference(model: str) -> str:
    """What to record as the file's model: a bundle folder's full path, a source-prefixed name as given
    (``hf-hub:org/repo``), else the registry's canonical name."""
    from clipworks.models.registry import parse_model_name
    from clipworks.models.sources import split_prefix

    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return model if split_prefix(model)[0] is not None else parse_model_name(model).name


def _choose_model(model: str | None, target_kind: str | None, existing) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """The model to encode with and why: --model, else --for hailo's, else the target file's, else the default."""
    from clipworks.prompts import HAILO_MODEL

    if model:
        return model, "--model"
    if target_kind == "hailo":
        return HAILO_MODEL, "--for hailo"
    made_for = existing.made_for() if existing is not None else None
    if made_for:
        return made_for, f"the model {existing.source} was made for"
    return default_model(), "the default model"


TARGETS = ("hailo",)


@app.command(cls=greedy_list_command("--texts-list"))
def texts(
    text: Annotated[list[str] | None, typer.Argument(help="Prompts to encode, all positive (see --negative).")] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help=f"Hailo-format JSON file to write (default: {DEFAULT_TEXTS_FILE}; with --image-path, none).",
            show_default=False,
        ),
    ] = None,
    texts_list: Annotated[
        list[str] | None,
        typer.Option(
            "--texts-list",
            help="Hailo's --texts-list A B C: the first text is the positive, the others negatives.",
        ),
    ] = None,
    negative: Annotated[
        list[str] | None, typer.Option("--negative", "-n", help="Negative prompt (repeatable).")
    ] = None,
    texts_json: Annotated[
        Path | None, typer.Option(help='A {"positive": [...], "negative": [...]} file (Hailo --texts-json).')
    ] = None,
    interactive: Annotated[
        bool,
        typer.Option(
            "--interactive",
            help="Hailo's --interactive: texts from standard input, the first positive, the rest negative.",
        ),
    ] = False,
    stdin: Annotated[
        bool, typer.Option("--stdin", help="Texts from standard input, one a line; '-text' marks a negative.")
    ] = False,
    append: Annotated[
        bool,
        typer.Option(
            "--append", help="Add the prompts to the existing -o file (its empty slots first) instead of replacing it."
        ),
    ] = False,
    target_kind: Annotated[
        str | None,
        typer.Option("--for", help="hailo: encode with Hailo's model (RN50x4, 640-d), what its app matches."),
    ] = None,
    image_path: Annotated[Path | None, typer.Option(help="Also print how this image matches the prompts.")] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Probability a match must exceed (default 0.8, or the --append file's).")
    ] = None,
    prefix: Annotated[
        str | None, typer.Option(help="Prefix of every non-ensemble prompt (default 'A photo of a ').")
    ] = None,
    ensemble: Annotated[bool, typer.Option(help="Average each prompt over Hailo's ensemble templates.")] = False,
    model: PromptFileModelOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
) -> None:
    """Encode prompts into the text-embedding JSON of Hailo's CLIP app (the text_image_matcher tool)."""
    from clipworks.prompts import (
        DEFAULT_TEXT_PREFIX,
        DEFAULT_THRESHOLD,
        HAILO_DIM,
        HAILO_SLOTS,
        MODEL_KEY,
        PromptSet,
        encode_entries,
        match,
    )

    sources = sum(bool(x) for x in (text, texts_list, texts_json, interactive, stdin))
    if sources != 1:
        raise UsageError(
            "give prompts as arguments, or --texts-list, --texts-json FILE, --interactive or --stdin "
            "(exactly one of them)"
        )
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold must be between 0 and 1, not {threshold}")
    if target_kind is not None and target_kind not in TARGETS:
        raise UsageError(f"--for must be {', '.join(TARGETS)}, not {target_kind!r}")
    if append and output is None:
        raise UsageError("--append needs -o FILE: the prompt file to add to")
    save = output is not None or image_path is None  # a look at one image must not replace a file made earlier
    target = output or Path(DEFAULT_TEXTS_FILE)
    existing = _existing_prompt_file(target, append) if save else None
    base = existing if append and existing is not None else None
    options = {
        "threshold": threshold if threshold is not None else (base.threshold if base else DEFAULT_THRESHOLD),
        "text_prefix": prefix if prefix is not None else (base.text_prefix if base else DEFAULT_TEXT_PREFIX),
        "ensemble": ensemble,
        "slots": 0 if base is not None else HAILO_SLOTS,  # an --append file keeps its own slots
    }
    if base is not None:
        options["ensemble_template"] = base.ensemble_template
    if texts_json:
        prompt_set = PromptSet.from_texts_json(texts_json, **options)
    else:
        if interactive or stdin:
            positive, negatives = _read_lines(hailo=interactive, prefix=options["text_prefix"])
        elif texts_list:
            positive, negatives = texts_list[:1], texts_list[1:]  # Hailo: the first is the searched text
        else:
            positive, negatives = list(text or []), []
        negatives += list(negative or [])
        if not positive and not negatives:
            raise UsageError("no prompts given")
        prompt_set = PromptSet.from_texts(positive, negatives, **options)
    model_name, why = _choose_model(model, target_kind, existing)
    clip = load_model(model_name, device, precision)
    if target_kind == "hailo" and clip.embed_dim != HAILO_DIM:
        raise UsageError(f"--for hailo needs {HAILO_DIM}-d embeddings (RN50x4); --model {model} gives {clip.embed_dim}")
    if base is not None and base.dim not in (None, clip.embed_dim):
        made_for = base.made_for()
        raise UsageError(
            f"--append {target}: its prompts are {base.dim}-d{f' ({made_for})' if made_for else ''} but {clip.name} "
            f"({why}) gives {clip.embed_dim}-d ones; they cannot be matched together. "
            f"{f'Use --model {made_for}, or ' if made_for else ''}drop --append to replace the file"
        )
    encode_entries(prompt_set, clip.encode_texts)
    if save:
        if base is not None:
            base.add_entries(prompt_set.entries)
            prompt_set = base
        prompt_set.extra[MODEL_KEY] = _model_reference(model_name)
        replaced = "" if append else (" (replaced the previous file)" if target.exists() else "")
        saved = prompt_set.save(target)
        prompts = len(prompt_set.active_indices())
        info(f"wrote {quote_path(saved)}{replaced} ({prompts} prompts, {clip.embed_dim}-d, {clip.name}, {why})")
    else:
        info(f"prompts not saved (pass -o FILE to save them, e.g. -o {DEFAULT_TEXTS_FILE})")
    if image_path is not None:
        result = match(clip.encode_images([image_path]), prompt_set)[0]
        for index, probability in sorted(result.probabilities.items(), key=lambda kv: -kv[1]):
            entry = prompt_set.entries[index]
            tag = " (negative)" if entry.negative else ""
            print(f"{probability:.3f}  {entry.text}{tag}")
        verdict = "passed" if result.passed else "did not pass"
        print(f"best: {result.text} ({result.probability:.3f}) {verdict} the threshold {prompt_set.threshold}")
