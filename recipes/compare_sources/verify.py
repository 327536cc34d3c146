"""The recipe's check: does the candidate `rt compare` recommended finetune best?

Reads ``RUN/compare/compare.json`` and each candidate's ``RUN/eval/<name>/report.json`` (`rt evaluate` of the
model `rt finetune` made starting from the candidate's probe), writes ``RUN/verify.md`` and ``RUN/verify.json``.
Exit code 0 either way; the verdict is in the files (a recipe reports, it does not hide a miss).

Usage: ``python recipes/compare_sources/verify.py runs/compare_sources``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    run = Path((argv if argv is not None else sys.argv[1:])[0])
    report = json.loads((run / "compare" / "compare.json").read_text())
    rows = []
    for c in report["candidates"]:
        name = Path(c["spec"].split("=", 1)[1]).name if "=" in c["spec"] else c["spec"]
        ev = run / "eval" / name / "report.json"
        finetuned = json.loads(ev.read_text())["accuracy"] if ev.exists() else None
        rows.append({"spec": c["spec"], "name": name, "probe": c["accuracy"], "interval": c["interval"],
                     "logme": c["logme"], "images_per_second": c["images_per_second"], "finetuned": finetuned})  # fmt: skip
    done = [r for r in rows if r["finetuned"] is not None]
    best = max(done, key=lambda r: r["finetuned"])["spec"] if done else None
    verdict = {"recommended": report["recommended"], "best_finetuned": best, "agree": best == report["recommended"]}
    lines = [
        f"| candidate | probe k={report['k']} (95% interval) | LogME | finetuned layer4, from its probe | recommended |",
        "|---|---:|---:|---:|:-:|",
    ]
    for r in rows:
        lo, hi = r["interval"]
        ft = "-" if r["finetuned"] is None else f"{r['finetuned']:.3f}"
        mark = "yes" if r["spec"] == report["recommended"] else ""
        lines.append(f"| `{r['name']}` | {r['probe']:.3f} ({lo:.3f} - {hi:.3f}) | {r['logme']:.3f} | {ft} | {mark} |")
    lines += [
        "",
        f"rt compare recommended `{report['recommended']}`: {report['reason']}.",
        f"Highest finetuned test accuracy ({report['n_test']} images): `{best}`. "
        + ("The recommendation is the one that finetunes best." if verdict["agree"] else "They differ."),
    ]
    (run / "verify.md").write_text("\n".join(lines) + "\n")
    (run / "verify.json").write_text(json.dumps({"rows": rows, **verdict}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
