"""The house rules the import-linter contracts (`make lint`) do not cover: every module of the
library reads in one sitting, and no file imports another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 500
OUR_PACKAGES = ("rsray", "pipelines", "tests", "benchmarks", "tools")


def python_files(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("path", python_files("rsray", "pipelines"), ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_is_over_500_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(REPO)} has {lines} lines: split it by concern"


def private_imports(path: Path) -> list[str]:
    """`from <our module> import _name` in `path` (a module's own privates stay its own)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level > 0 or (node.module or "").split(".")[0] in OUR_PACKAGES:  # relative imports are ours too
            where = "." * node.level + (node.module or "")
            found += [f"{where}.{a.name}" for a in node.names if a.name.startswith("_") and a.name != "__version__"]
    return found


def test_no_file_imports_another_modules_private_names():
    offenders = {
        str(path.relative_to(REPO)): names for path in python_files(*OUR_PACKAGES) if (names := private_imports(path))
    }
    assert offenders == {}


def test_the_private_import_scan_sees_one(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from rsray.train.run import _hidden, public\nfrom .data import _rows\n")
    assert private_imports(probe) == ["rsray.train.run._hidden", ".data._rows"]
