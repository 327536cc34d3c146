"""Run the benchmarks: ``python -m benchmarks [name ...] [--quick | --full] [other options]``.

Every ``benchmarks/bench_*.py`` module is discovered (so new ones need no registration); names may be
given with or without the ``bench_`` prefix. Options after the names are passed to each benchmark's
``main(argv)``; ``--list`` prints the names. Exit code 1 if any benchmark failed (the others still run).
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover() -> list[str]:
    """Names of the available benchmarks (``bench_extract.py`` -> ``extract``), sorted."""
    return sorted(p.stem[len("bench_") :] for p in HERE.glob("bench_*.py"))


def split_args(argv: list[str], names: list[str]) -> tuple[list[str], list[str]]:
    """Leading arguments that name benchmarks, and the options passed on to each."""
    chosen: list[str] = []
    rest = list(argv)
    while rest and not rest[0].startswith("-"):
        name = rest.pop(0).removeprefix("bench_").removesuffix(".py")
        if name not in names:
            raise SystemExit(f"unknown benchmark {name!r}; available: {', '.join(names)}")
        chosen.append(name)
    return chosen or names, rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = discover()
    if "--list" in argv:
        print("\n".join(names))
        return 0
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\navailable: " + ", ".join(names))
        return 0
    chosen, rest = split_args(argv, names)
    failed: list[str] = []
    results = []
    for name in chosen:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        try:
            results.append(module.main(list(rest)))
        except SystemExit as exc:  # argparse errors and --help inside one benchmark
            if exc.code not in (0, None):
                failed.append(name)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            print(json.dumps({"bench": name, "error": traceback.format_exc(limit=1).strip().splitlines()[-1]}))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
