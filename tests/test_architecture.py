"""The package's shape holds (docs/architecture.md): the import-linter layers contract, every
import at the top of its file, every module under 500 lines and every function under 80."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "icl_probe"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80  # the def line to the last line, docstring included


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _lint_imports() -> str:
    exe = Path(sys.executable).with_name("lint-imports")
    found = str(exe) if exe.is_file() else shutil.which("lint-imports")
    if found is None:
        pytest.fail("lint-imports is not installed: `make setup` installs it with the test "
                    "extras (import-linter)")
    return found


def test_the_layers_contract_holds():
    proc = subprocess.run([_lint_imports(), "--no-cache"], cwd=PACKAGE.parent,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 kept, 0 broken" in proc.stdout, proc.stdout


def test_the_contract_can_fail(tmp_path):
    """The contract catches an upward import: a copy of the package where the models layer
    imports the report fails it."""
    copy = tmp_path / "repo"
    shutil.copytree(PACKAGE, copy / "icl_probe",
                    ignore=shutil.ignore_patterns("__pycache__", "*.jsonl", "*.csv"))
    shutil.copy(PACKAGE.parent / "pyproject.toml", copy / "pyproject.toml")
    bad = copy / "icl_probe" / "models" / "devices.py"
    bad.write_text(bad.read_text() + "\nfrom ..report import write_report  # noqa\n")
    proc = subprocess.run([_lint_imports(), "--no-cache"], cwd=copy, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(copy), "PATH": ""})
    assert proc.returncode != 0 and "icl_probe.models.devices -> icl_probe.report" in \
        proc.stdout.replace("\n", " "), proc.stdout + proc.stderr


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_import_is_at_the_top_of_its_file(path):
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    late = [f"line {n.lineno}" for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in top]
    assert not late, f"{path}: imports inside functions or blocks at {late}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_are_small(path):
    text = path.read_text()
    n_lines = len(text.splitlines())
    assert n_lines < MAX_MODULE_LINES, f"{path}: {n_lines} lines"
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(ast.parse(text))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path}: {long}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_says_its_job(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and len(doc.split()) >= 5, f"{path}: no module docstring saying its job"
