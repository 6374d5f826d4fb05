"""The import layers of pyproject.toml's import-linter contracts hold, and a violation breaks the check.

CI runs the check on the package (`lint-imports` in .ci/run); these tests prove the contracts catch what they name,
lazy imports inside functions included, so a green CI means the runtime really cannot reach torch.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_CONTRACT = "models and runtime never import export"
TORCH_CONTRACT = "torch and open_clip are imported only under clipworks.export"


def lint_imports(src: Path) -> subprocess.CompletedProcess[str]:
    """import-linter over the package in ``src``, with this checkout's contracts."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run(
        [sys.executable, "-c", code, "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=src,
        env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("layers") / "src"
    shutil.copytree(ROOT / "src" / "clipworks", src / "clipworks", ignore=shutil.ignore_patterns("__pycache__"))
    return src


# (module, line appended to it, the contract it breaks). Function-level imports, as the old code had them.
VIOLATIONS = [
    ("models/store.py", "def _export():\n    from clipworks.export import export_model\n", RUNTIME_CONTRACT),
    ("runtime/encoder.py", "def _export():\n    import clipworks.export.exporter\n", RUNTIME_CONTRACT),
    # Through another module: models -> cli.export -> export is still models reaching export.
    ("models/registry.py", "def _cli():\n    import clipworks.cli.export\n", RUNTIME_CONTRACT),
    ("models/registry.py", "def _archs():\n    import open_clip\n", TORCH_CONTRACT),
    ("tokenizer.py", "def _simple():\n    from open_clip.tokenizer import SimpleTokenizer\n", TORCH_CONTRACT),
    ("video/models.py", "def _load():\n    import torch\n", TORCH_CONTRACT),
    ("runtime/sessions.py", "def _gpu():\n    import torchvision\n", TORCH_CONTRACT),
]


# No test runs the check on the package as it is: CI does (`lint-imports` in .ci/run), and each row here proves it
# too, since one added import gives exactly "1 broken" only when the rest of the package breaks neither contract
# (a package already breaking one contract would give "2 broken" at the other contract's rows).
@pytest.mark.parametrize(("module", "line", "contract"), VIOLATIONS)
def test_a_forbidden_import_breaks_the_check(package_copy: Path, module: str, line: str, contract: str) -> None:
    path = package_copy / "clipworks" / module
    original = path.read_text(encoding="utf-8")
    path.write_text(original + "\n\n" + line, encoding="utf-8")
    try:
        done = lint_imports(package_copy)
    finally:
        path.write_text(original, encoding="utf-8")
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{contract}" in done.stdout and "BROKEN" in done.stdout
    assert "1 broken" in done.stdout
