"""The package's own shape, measured from its source: no module grows into the one
file that holds everything, and no class into the one object that does everything
(STYLE.md: client_python's 800-line exposition.py, celery-exporter's 580-line class)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 250


def sizes(package: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(lines per module, lines per class) of every module of ``package``; a class is
    measured from its first decorator to its last line, nested classes on their own."""
    modules, classes = {}, {}
    for path in sorted(package.glob("*.py")):
        source = path.read_text()
        modules[path.name] = len(source.splitlines())
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                classes[f"{path.name}:{node.name}"] = (node.end_lineno or node.lineno) - first + 1
    return modules, classes


def test_no_module_over_600_lines_and_no_class_over_250() -> None:
    modules, classes = sizes(ROOT / "exporter")
    assert "history.py" in modules and "JobHistory" in " ".join(classes)   # it measures
    too_long = {name: n for name, n in modules.items() if n > MAX_MODULE_LINES}
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: {too_long}"
    too_big = {name: n for name, n in classes.items() if n > MAX_CLASS_LINES}
    assert not too_big, f"classes over {MAX_CLASS_LINES} lines: {too_big}"


def test_the_measure_counts_what_it_should(tmp_path: Path) -> None:
    (tmp_path / "big.py").write_text("import os\n\n\n@decorated\nclass Big:\n" +
                                     "    x = 1\n" * 300 + "\n\nclass Small:\n    pass\n")
    modules, classes = sizes(tmp_path)
    assert modules == {"big.py": 309}
    assert classes == {"big.py:Big": 302, "big.py:Small": 2}
