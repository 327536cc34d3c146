"""The README's set-up commands are what CI runs, and the `test` extra is all the test suite needs."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as md
import os
import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
# needed by the suite without an import statement in tests/: torch.onnx.export imports onnxscript (the ONNX
# export test), and the offline recipe's make_data.py (run by its test) imports skimage
INDIRECT = ("onnxscript", "skimage")
# the package, the repo's folders, and the suite's own helper modules (tests/*.py import each other)
LOCAL = {"resnet_transfer", "tests", "benchmarks"} | {p.stem for p in (ROOT / "tests").glob("*.py")}


def _readme_setup_lines() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M)
    assert block, "README.md has no code block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readme_setup_commands_byte_for_byte() -> None:
    lines = _readme_setup_lines()
    env = {**os.environ, "CI_DRY_RUN": "1"}
    out = subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=env, capture_output=True, text=True, check=True)
    ran = out.stdout.splitlines()
    tests = [line for line in lines if "pytest" in line]
    assert len(tests) == 1 and tests[0] in ran  # the test command, whole
    for line in lines:
        if line not in tests:
            assert line.split(" && ")[0] in ran  # the install part of every other line, verbatim
    assert "ruff check ." in ran and "ruff format --check ." in ran
    assert 'pip install -e ".[test]"' in tests[0] and "python -m pytest -q" in tests[0]


def test_hypothesis_gives_every_clone_the_same_verdict() -> None:
    """The README's test command (and CI) runs Hypothesis derandomised and without an example database, so
    the examples drawn do not depend on luck or on a `.hypothesis/` folder; a random profile with more
    examples is there for hunting bugs locally."""
    from hypothesis import settings

    addopts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    assert "--hypothesis-profile=fixed" in addopts
    fixed, random = settings.get_profile("fixed"), settings.get_profile("random")
    assert fixed.derandomize and fixed.database is None
    assert not random.derandomize and random.max_examples > fixed.max_examples
    assert ".hypothesis" not in (ROOT / ".ci" / "run").read_text()


def _optional_imports(tree: ast.AST) -> set[int]:
    """ids of import nodes inside ``try: ... except ImportError`` (optional speed-ups, e.g. onnxruntime)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def _imported_top_level_modules() -> set[str]:
    found: set[str] = set()
    for path in sorted((ROOT / "tests").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        optional = _optional_imports(tree)
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "importorskip" and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.add(arg.value.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in LOCAL}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(requirements: list[str]) -> set[str]:
    return {_canonical(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in requirements}


def test_test_extra_declares_every_module_the_suite_needs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = _declared(project["dependencies"]) | _declared(project["optional-dependencies"]["test"])
    modules = _imported_top_level_modules() | set(INDIRECT)
    assert {"pytest", "hypothesis", "torch", "onnx"} <= modules  # the scan sees the suite's imports
    dists = md.packages_distributions()
    missing = {}
    for m in sorted(modules):
        importlib.import_module(m)  # installed here
        owners = {_canonical(d) for d in dists.get(m, [m])}
        if not owners & declared:
            missing[m] = sorted(owners)
    assert not missing, f"modules the tests need but neither the dependencies nor the test extra declare: {missing}"
