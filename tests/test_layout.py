"""The code's shape as the README promises it: short functions, a layout table that
names every module of `tasks/` and `pipelines/`."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60


def _modules(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py")
                  if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", _modules("tasks", "pipelines"),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_is_longer_than_the_limit(path):
    tree = ast.parse(path.read_text())
    too_long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: {too_long}"


def test_the_readme_layout_table_names_every_module():
    rows = [line for line in (ROOT / "README.md").read_text().splitlines()
            if line.startswith("| `")]
    named = {name for row in rows for name in re.findall(r"`([\w/.]+)`", row.split("|")[1])}
    missing = []
    for path in _modules("tasks", "pipelines"):
        relative = path.relative_to(ROOT)
        if relative.name == "__init__.py":
            continue
        folders = {str(parent) + "/" for parent in relative.parents if str(parent) != "."}
        if str(relative) not in named and not folders & named:
            missing.append(str(relative))
    assert not missing, f"README's layout table does not name {missing}"
    for name in named:
        if name.startswith(("tasks/", "pipelines/")):
            assert (ROOT / name).exists(), f"README's layout table names {name}, not in the tree"
