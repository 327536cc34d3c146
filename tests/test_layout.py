"""The package's shape: wings that import one way (the import-linter contracts), no import cycles, no
reaching into another wing's private names, faces whose names never change meaning, sizes a newcomer can
hold (docs/CONTRIBUTING.md)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "resnet_transfer"
WINGS = ["base", "images", "backbone", "cache", "head", "models", "finetuning", "tools", "cli"]


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(name: str, path: Path) -> list[tuple[int, str, list[str]]]:
    """Every import statement of a module (function bodies and TYPE_CHECKING blocks included), as
    (line, absolute module imported from, names)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((node.lineno, mod, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name, []) for a in node.names)
    return found


def _edges() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for _, mod, names in _imports(name, path):
            submodules = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in mods]
            # `from pkg import sub` depends on the module pkg.sub; `from pkg import name`, on pkg itself
            targets = submodules if submodules and len(submodules) == len(names) else [mod, *submodules]
            graph[name].update(t for t in targets if t in mods and t != name)
    return graph


def test_import_linter_contracts_are_kept() -> None:
    r = subprocess.run(["lint-imports", "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_the_layers_contract_names_every_wing_in_order() -> None:
    """The contract covers the wings themselves (not modules one by one), so a new module is checked too."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    named = [w.strip().removeprefix("resnet_transfer.") for layer in layers for w in layer.split("|")]
    assert sorted(named) == sorted(WINGS)
    assert named[0] == "cli" and named[-1] == "base"
    assert not any("ignore_imports" in c for c in contracts)
    on_disk = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").exists())
    assert on_disk == sorted(WINGS)  # every folder of the package is a wing the contract orders


def test_no_import_cycles_between_modules() -> None:
    """Tarjan's strongly connected components over every import, function-level and TYPE_CHECKING ones
    included; a face importing its own modules is not an edge (faces import nothing but base.lazy)."""
    graph = _edges()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


def test_no_module_reaches_into_another_wings_private_names() -> None:
    bad = []
    for name, path in _modules().items():
        parts = name.split(".")
        wing = parts[1] if len(parts) > 1 else None
        for line, mod, names in _imports(name, path):
            mparts = mod.split(".")
            if mparts[0] != "resnet_transfer" or len(mparts) < 2 or mparts[1] == wing:
                continue
            if len(mparts) > 2 and mod not in ("resnet_transfer.base.lazy", "resnet_transfer.base.version"):
                # a module of another wing instead of its face
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
            private = [n for n in mparts[2:] + names if n.startswith("_") and not n.endswith("__")]
            if private:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports private {mod} {names}")
    assert bad == []


def test_faces_hold_no_logic_and_import_nothing_heavy() -> None:
    for wing in WINGS:
        face = PKG / wing / "__init__.py"
        tree = ast.parse(face.read_text())
        kinds = {type(n).__name__ for n in tree.body}
        assert kinds <= {"Expr", "ImportFrom", "Assign"}, (wing, kinds)
        assert len(face.read_text().splitlines()) <= 80, wing


def test_no_public_name_is_also_a_module() -> None:
    """`rt.extract` once turned into the submodule `resnet_transfer.extract` after anything imported it."""
    mods = _modules()
    short = {m.rsplit(".", 1)[-1] for m in mods}
    import resnet_transfer as rt

    clashes = sorted(set(rt.__all__) & short)
    for wing in WINGS[:-1]:
        face = __import__(f"resnet_transfer.{wing}", fromlist=["__all__"])
        clashes += [f"{wing}.{n}" for n in face.__all__ if f"resnet_transfer.{wing}.{n}" in mods]
    assert clashes == []


def test_every_public_name_reads_the_same_twice_in_a_fresh_interpreter() -> None:
    """Read each public name, import every module of the package, read it again: the same object, and the
    kind the README's API table says (function or class), defined in the wing the table's row names."""
    code = r"""
import importlib, json, pkgutil, sys
import resnet_transfer as rt
assert "torch" not in sys.modules, "import resnet_transfer loaded torch"
first = {n: getattr(rt, n) for n in rt.__all__}
for m in pkgutil.walk_packages(rt.__path__, "resnet_transfer."):
    importlib.import_module(m.name)
out = {}
for n in rt.__all__:
    again = getattr(rt, n)
    kind = "class" if isinstance(again, type) else "function" if callable(again) and hasattr(again, "__code__") else type(again).__name__
    out[n] = [again is first[n], kind, getattr(again, "__module__", "")]
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    documented = _readme_api_table()
    assert sorted(seen) == sorted(documented)
    for name, (same, kind, module) in seen.items():
        assert same, name
        assert kind == documented[name][0], (name, kind)
        assert module.startswith(f"resnet_transfer.{documented[name][1]}."), (name, module)


def _readme_api_table() -> dict[str, tuple[str, str]]:
    """``| `rt.name` | function | wing | ... |`` rows of the README's Python API table."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`rt.") and cells[1] in ("function", "class"):
            rows[cells[0].strip("`").removeprefix("rt.").split("(")[0]] = (cells[1], cells[2].strip("`"))
    return rows


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_sizes_a_newcomer_can_hold(path: Path) -> None:
    cli = "cli" in path.relative_to(PKG).parts
    src = path.read_text()
    assert len(src.splitlines()) <= (300 if cli else 500)
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(src))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > (120 if cli else 80)
    ]
    assert long == []


def test_only_the_cli_and_the_reporter_print() -> None:
    """The library speaks through base.report's reporter: no print() outside it and the CLI."""
    bad = []
    for name, path in _modules().items():
        if name.startswith("resnet_transfer.cli") or name == "resnet_transfer.base.report":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert bad == []
