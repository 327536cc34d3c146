"""Collect the offline_digits results: read the report.json files that `rt evaluate` wrote under
``RUN/eval/<method>/<k>/`` and write ``RUN/results.md`` (a markdown table) and ``RUN/accuracy_vs_k.png``.

Nothing here computes an accuracy: every number is one that an `rt evaluate` report holds.

Usage: ``python recipes/offline_digits/results.py RUN_DIR``
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

METHODS = {
    "probe_source": "linear probe, source-pretrained features",
    "probe_random": "linear probe, random-init features",
    "scratch": "from scratch (all layers, random init)",
    "finetune_layer4": "finetune layer4 (from the source model)",
    "finetune_all": "finetune all (from the source model)",
}


def _k_order(k: str) -> tuple[int, str]:
    return (10**9, k) if k == "all" else (int(k.lstrip("k")), k)


def collect(run: Path) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """``{method: {k: accuracy}}`` from ``run/eval/<method>/<k>/report.json``, and images per class of
    each k (from the data manifest)."""
    acc: dict[str, dict[str, float]] = {}
    for report in sorted((run / "eval").glob("*/*/report.json")):
        method, k = report.parent.parent.name, report.parent.name
        acc.setdefault(method, {})[k] = float(json.loads(report.read_text())["accuracy"])
    per_class: dict[str, int] = {}
    manifest = run / "data" / "manifest.json"
    if manifest.exists():
        counts = json.loads(manifest.read_text())["counts"]
        for split, by_class in counts.items():
            if split.startswith("target/train_"):
                per_class[split.split("_", 1)[1]] = min(by_class.values())
    return acc, per_class


def write_table(run: Path, acc: dict[str, dict[str, float]], per_class: dict[str, int]) -> Path:
    ks = sorted({k for v in acc.values() for k in v}, key=_k_order)
    head = [f"k={k.lstrip('k')}" if k != "all" else f"all ({per_class.get('all', '?')}+)" for k in ks]
    lines = [
        "| method | " + " | ".join(head) + " |",
        "|---|" + "---:|" * len(ks),
    ]
    for method, label in METHODS.items():
        if method in acc:
            cells = [f"{acc[method][k]:.3f}" if k in acc[method] else "-" for k in ks]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    n_test = ""
    manifest = run / "data" / "manifest.json"
    if manifest.exists():
        test = json.loads(manifest.read_text())["counts"].get("target/test", {})
        n_test = f" on {sum(test.values())} test images ({', '.join(f'{c}: {n}' for c, n in test.items())})"
    text = (
        f"Target task: 3 classes, accuracy{n_test}; chance = 0.333. k = training images per class.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    out = run / "results.md"
    out.write_text(text)
    return out


def write_plot(run: Path, acc: dict[str, dict[str, float]], per_class: dict[str, int]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, label in METHODS.items():
        if method not in acc:
            continue
        ks = sorted(acc[method], key=_k_order)
        xs = [per_class.get(k, _k_order(k)[0]) for k in ks]
        ax.plot(xs, [acc[method][k] for k in ks], marker="o", label=label)
    ax.axhline(1 / 3, color="grey", linestyle=":", label="chance")
    ax.set_xscale("log")
    all_ks = sorted({k for v in acc.values() for k in v}, key=_k_order)
    ticks = [per_class.get(k, _k_order(k)[0]) for k in all_ks]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("training images per class")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("offline_digits: 3-class target (digits 7/8/9 on photos)")
    ax.legend(fontsize=7, loc="lower center", ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run / "accuracy_vs_k.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: results.py RUN_DIR", file=sys.stderr)
        return 2
    run = Path(args[0])
    acc, per_class = collect(run)
    if not acc:
        print(f"no reports under {run}/eval/*/*/report.json", file=sys.stderr)
        return 1
    table = write_table(run, acc, per_class)
    write_plot(run, acc, per_class)
    print(table.read_text(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
