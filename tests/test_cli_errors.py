"""Usage errors, help at 80 columns and missing extras, as a user meets them: one line, an exit code, no traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import clipworks
from clipworks.cli.main import build_command, main

SRC = str(Path(clipworks.__file__).parents[1])  # the clipworks under test, for the child processes

# One row per class of usage error: the arguments, and what the one error line must name.
USAGE_ERRORS = [
    pytest.param([], "needs a command", id="no-args"),
    pytest.param(["embed"], "embed needs a command", id="group-without-command"),
    pytest.param(["bogus"], "'bogus'", id="unknown-command"),
    pytest.param(["classify", "--bogus", "x.jpg"], "--bogus", id="unknown-option"),
    pytest.param(["embed", "images", "x.jpg"], "--output", id="missing-required-option"),
    pytest.param(["embed", "images", "-o", "{tmp}/e.npy"], "INPUTS", id="missing-argument"),
    pytest.param(["search", "--top-k", "abc", "q"], "--top-k", id="bad-int"),
    pytest.param(["video", "search", "q", "v.mp4", "--top-k", "abc"], "--top-k", id="bad-int-video"),
    pytest.param(["stream", "--classify-every", "soon"], "--classify-every", id="bad-float"),
    pytest.param(["embed", "images", "{tmp}/nowhere", "-o", "{tmp}/e.npy"], "nowhere", id="missing-path"),
    pytest.param(["classify", "{tmp}", "--labels-file", "{tmp}/no-labels.txt"], "no-labels.txt", id="missing-file"),
    pytest.param(["embed", "images", "{tmp}", "-o", "{tmp}/no/e.npy"], "e.npy", id="missing-output-folder"),
    pytest.param(
        ["video", "features", "v.mp4", "--extraction-fps", "1", "--extraction-total", "3"],
        "--extraction-fps",
        id="mutually-exclusive",
    ),
    pytest.param(
        ["interrogate", "{tmp}", "--tags-file", "{tmp}/t.txt", "--vocabulary", "imagenet1k"],
        "--tags-file",
        id="mutually-exclusive-tags",
    ),
]


def _args(args: list[str], tmp_path: Path) -> list[str]:
    return [a.format(tmp=tmp_path) for a in args]


def _one_error_line(err: str, named: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and named in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize(("args", "named"), USAGE_ERRORS)
def test_each_usage_error_class_is_one_line_and_exit_2(capsys, tmp_path, args, named) -> None:
    code = main(_args(args, tmp_path))
    _, err = capsys.readouterr()
    assert code == 2, err
    _one_error_line(err, named)


@pytest.mark.parametrize(
    ("args", "named"), [row for row in USAGE_ERRORS if row.id in ("no-args", "unknown-option", "bad-int")]
)
def test_usage_errors_through_the_console_entry(tmp_path, args, named) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "from clipworks.cli.main import entry; entry()", *_args(args, tmp_path)],
        capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": SRC}, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc.stderr, named)


def test_bare_command_shows_the_commands_on_stdout(capsys) -> None:
    assert main([]) == 2
    out, _ = capsys.readouterr()
    assert "embed" in out and "stream" in out and "video" in out


def _commands(command, path=()):  # type: ignore[no-untyped-def]
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


COMMANDS = [path for path, _ in _commands(build_command())]
# Typer's own names for Python types, which help must not show ("<list[Path]>", "<str>").
PYTHON_TYPE = re.compile(r"<(?:list\[|str>|int>|float>|path>|bool>)")


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "clipworks")
def test_help_reads_well_at_80_columns(capsys, monkeypatch, path) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert main([*path, "--help"]) == 0
    out, _ = capsys.readouterr()
    assert max(len(line) for line in out.splitlines()) <= 80, out
    assert "…" not in out and not PYTHON_TYPE.search(out), out
    command = dict(_commands(build_command()))[path]
    for param in command.params:
        for name in (*param.opts, *param.secondary_opts):
            if name.startswith("-"):
                assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", out), f"{name} missing or cut:\n{out}"


# A runtime-only install: the optional module is made unimportable (sys.modules[name] = None) before the CLI runs.
MISSING_EXTRAS = [
    pytest.param("cv2", ["stream", "--output", "{tmp}/o.mp4"], "--output", "stream", id="stream-output"),
    pytest.param("cv2", ["stream", "--multi-stream"], "--multi-stream", "stream", id="multi-stream"),
    pytest.param("cv2", ["stream", "--detector", "person"], "--detector person", "stream", id="detector-person"),
    pytest.param("trackers", ["stream", "--detector", "person"], "trackers", "stream", id="tracker"),
    pytest.param("fastapi", ["stream", "--web", "8080"], "--web", "stream", id="stream-web"),
    pytest.param("uvicorn", ["stream", "--web", "8080"], "uvicorn", "stream", id="stream-web-server"),
    pytest.param("av", ["stream"], "av", "stream", id="stream-av"),
    pytest.param("av", ["video", "features", "v.mp4"], "av", "video", id="video-features-av"),
    pytest.param("av", ["video", "search", "q", "v.mp4"], "av", "video", id="video-search-av"),
    pytest.param("pyarrow", ["embed", "images", "{tmp}", "-o", "{tmp}/e.parquet"], "pyarrow", "parquet", id="parquet"),
]


@pytest.mark.parametrize(("module", "args", "named", "extra"), MISSING_EXTRAS)
def test_missing_extra_is_one_line_naming_it(tmp_path, module, args, named, extra) -> None:
    script = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "from clipworks.cli.main import entry\n"
        f"sys.argv = ['clipworks', *{_args(args, tmp_path)!r}]\n"
        "entry()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": SRC}, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    _one_error_line(proc.stderr, named)
    assert f"pip install 'clipworks[{extra}]'" in proc.stderr
    assert list(tmp_path.iterdir()) == [], "nothing may be written before the check"


@pytest.mark.parametrize("command", [["embed", "texts", "a dog"], ["video", "search", "a dog", "v.mp4"]])
def test_offline_missing_model_offers_the_random_variant(capsys, tmp_path, monkeypatch, command) -> None:
    monkeypatch.setenv("CLIPWORKS_HOME", str(tmp_path))
    monkeypatch.setenv("CLIPWORKS_OFFLINE", "1")
    monkeypatch.setenv("CLIPWORKS_MODEL", "ViT-B-32::openai")  # the video commands honour it too
    code = main(command)
    _, err = capsys.readouterr()
    assert code == 1
    _one_error_line(err, "ViT-B-32::random")
