"""Options every model-running command shares, and small rendering helpers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from clipworks.errors import ClipworksError, status
from clipworks.settings import DEFAULT_MODEL

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        envvar="CLIPWORKS_MODEL",
        help="Registry name (ViT-B-32::openai, ViT-B/32, ...) or bundle path.",
    ),
]
# Commands that write or read a Hailo prompt file: None means "the model the file was made for".
PromptFileModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        envvar="CLIPWORKS_MODEL",
        help="Registry name or bundle path (default: the model the prompt file was made for, RN50x4 for "
        f"Hailo's 640-d files, else {DEFAULT_MODEL}).",
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    str, typer.Option(help="auto, cpu, cuda, cuda:N, tensorrt, openvino, openvino:GPU, openvino-ep or coreml.")
]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        help="auto, fp32, fp16, int8, int8-static or bf16 (auto: fp16 on a GPU, int8-static on a CPU with VNNI or "
        "AMX, on OpenVINO where installed, else fp32; bf16 is opt-in: OpenVINO on a CPU with AMX-BF16 or "
        "AVX512-BF16)."
    ),
]
ThreadsOpt = Annotated[int | None, typer.Option(help="Inference threads (default: all cores).")]


def check_preprocess(preprocess: str) -> str:
    """``--preprocess`` is a decode mode: exact or fast."""
    if preprocess not in ("exact", "fast"):
        from clipworks.errors import UsageError

        raise UsageError(f"--preprocess must be exact or fast, not {preprocess!r}")
    return preprocess


MODEL_DEFAULT = DEFAULT_MODEL


def load_model(model: str, device: str, precision: str, threads: int | None = None, preprocess: str = "exact"):  # type: ignore[no-untyped-def]
    from clipworks.runtime.encoder import load

    return load(model, device=device, precision=precision, threads=threads, preprocess=preprocess)  # type: ignore[arg-type]


info = status


def error_line(e: ClipworksError, command: Any, argv: Sequence[str]) -> str:
    """The error's message, led by the flag that sets what it is about (``--device: ...``).

    Library errors name the argument at fault (``e.setting``, e.g. "device"); the command that ran is found by
    walking ``argv`` down the command tree, and its parameter of that name gives the flag, so a command whose
    model is a positional NAME gets no ``--model`` it does not have.
    """
    if not e.setting:
        return str(e)
    for token in argv:
        sub = getattr(command, "commands", {}).get(token)
        if sub is None:
            break
        command = sub
    for param in getattr(command, "params", []):
        if param.name == e.setting and param.param_type_name == "option":
            return f"{param.opts[0]}: {e}"
    return str(e)


def greedy_list_command(*flags: str) -> type[TyperCommand]:
    """A command class whose ``flags`` take every value up to the next option, as argparse's ``nargs='+'``
    (video_features' and Hailo's lists: ``--texts-list cat dog``). Click options take one value each, so
    such a flag is repeated before each of its values before click parses them."""

    class GreedyListCommand(TyperCommand):
        def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
            spread: list[str] = []
            flag: str | None = None
            for arg in args:
                if arg.startswith("-") and len(arg) > 1:
                    flag = arg if arg in flags else None
                    if flag is None:
                        spread.append(arg)
                    continue
                spread += [flag, arg] if flag else [arg]
            return super().parse_args(ctx, spread)

    return GreedyListCommand
