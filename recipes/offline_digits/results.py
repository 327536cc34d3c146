"""Collect the offline_digits results into ``RUN/results.md``, ``RUN/results.json`` and ``RUN/accuracy_vs_k.png``.

Inputs, all written by the run (nothing here trains a network or reads an image):

* ``RUN/curves/<backbone>/curve.json``: `rt curve`'s label-efficiency curves of the linear probe and a kNN
  on cached features: for each k, the test accuracy of a head fitted on k training images per class, one
  per seed.
* ``RUN/eval/<method>/k<k>/seed<s>/report.json``: ``rt evaluate`` reports of the trained networks
  (``sweep.py``: from scratch, finetune layer4 / all).

Every row is summarised as the mean over seeds with a 95% t-interval (mean +- t(0.975, n-1) * sd / sqrt(n));
the interval covers the choice of the k training images and the training seed, not the test set's sampling.

Usage::

    python recipes/offline_digits/results.py RUN_DIR
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# (key, label): the table's rows, in order. probe_* come from curves/, the rest from eval/.
METHODS = {
    "probe_source": "linear probe, source-pretrained features",
    "knn_source": "kNN, source-pretrained features",
    "probe_random": "linear probe, random-init features",
    "scratch": "from scratch (all layers, random init)",
    "probe_fitted": "probe via rt fit-head --head auto (the finetunes' start)",
    "finetune_layer4": "finetune layer4 (from the source model)",
    "finetune_all": "finetune all (from the source model)",
}

# -------------------------------------------------------------------------------------------- statistics


def t_quantile(n: int) -> float:
    """t(0.975, n-1): the 95% two-sided quantile for a mean of ``n`` samples (inf below 2)."""
    if n < 2:
        return math.inf
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def summarise(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample sd and 95% t-interval of per-seed accuracies."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    mean = float(v.mean()) if n else math.nan
    sd = float(v.std(ddof=1)) if n > 1 else 0.0
    half = t_quantile(n) * sd / math.sqrt(n) if n > 1 else math.inf
    return {"n": n, "mean": mean, "sd": sd, "half": half, "ci95": [mean - half, mean + half], "values": v.tolist()}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """mean(a - b) over seeds with a 95% t-interval, for runs paired by seed (the same k images)."""
    s = summarise(np.asarray(a, float) - np.asarray(b, float))
    return {"diff": s["mean"], "half": s["half"], "ci95": s["ci95"], "paired": True}


def difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """mean(a) - mean(b) with a 95% Welch interval (a and b are independent draws: other subsets/seeds)."""
    a_, b_ = np.asarray(a, float), np.asarray(b, float)
    va, vb = a_.var(ddof=1) / len(a_), b_.var(ddof=1) / len(b_)
    diff = float(a_.mean() - b_.mean())
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff": diff, "half": 0.0, "ci95": [diff, diff], "paired": False}
    dof = (va + vb) ** 2 / (va**2 / (len(a_) - 1) + vb**2 / (len(b_) - 1))
    from scipy.stats import t

    half = float(t.ppf(0.975, dof)) * se
    return {"diff": diff, "half": half, "ci95": [diff - half, diff + half], "paired": False}


# ------------------------------------------------------------------ k-subsets (shared with sweep.py)


def subset_rows(labels: Sequence[int], k: int, seed: int) -> np.ndarray:
    """Rows of ``k`` images per class, drawn at random by ``seed`` (all of a class's rows if it has fewer)."""
    y = np.asarray(labels)
    rng = np.random.default_rng([seed, k])
    rows = [rng.permutation(np.flatnonzero(y == c))[:k] for c in np.unique(y)]
    return np.sort(np.concatenate(rows))


def load_curve(path: Path) -> dict[str, dict[int, list[float]]]:
    """``{method: {k: [accuracy per seed]}}`` from `rt curve`'s ``curve.json`` (rows ``{"k", "method",
    "scores"}``; ``k = "all"`` is left out: the recipe's k are counts). Also reads the layout of the
    recipe's earlier stand-in (``{"methods": {name: [{"k", "accuracy"}]}}``)."""
    data = json.loads(path.read_text())
    out: dict[str, dict[int, list[float]]] = {}
    for method, rows in data.get("methods", {}).items():
        out[method] = {int(r["k"]): [float(a) for a in r["accuracy"]] for r in rows}
    for r in data.get("curve", []):
        if r["k"] != "all":
            out.setdefault(r["method"], {})[int(r["k"])] = [float(a) for a in r["scores"]]
    return out


# ------------------------------------------------------------------------------------------- collect


def collect(run: Path) -> dict[str, dict[int, list[float]]]:
    """``{method: {k: [accuracy per seed]}}`` from ``run/curves/<backbone>/curve.json`` and ``run/eval/*/k*/seed*/report.json``."""
    acc: dict[str, dict[int, list[float]]] = {}
    for path in sorted((run / "curves").glob("*.json")) + sorted((run / "curves").glob("*/curve.json")):
        name = path.stem if path.parent.name == "curves" else path.parent.name
        for method, by_k in load_curve(path).items():
            acc[f"{method}_{name}"] = by_k
    for report in sorted((run / "eval").glob("*/k*/seed*/report.json")):
        method, k = report.parent.parent.parent.name, int(report.parent.parent.name[1:])
        acc.setdefault(method, {}).setdefault(k, []).append(float(json.loads(report.read_text())["accuracy"]))
    return acc


def claims(acc: dict[str, dict[int, list[float]]]) -> dict[str, Any]:
    """The recipe's two claims, checked on the collected accuracies (intervals from :func:`summarise`)."""
    out: dict[str, Any] = {}
    probe = acc.get("probe_source", {})
    rivals = [m for m in ("probe_random", "scratch") if m in acc]
    per_k = {}
    for k in sorted(probe):
        lo = summarise(probe[k])["ci95"][0]
        his = {m: summarise(acc[m][k])["ci95"][1] for m in rivals if k in acc[m]}
        per_k[k] = {"probe_lo": lo, "rivals_hi": his, "holds": bool(his) and all(lo > h for h in his.values())}
    out["probe_beats_random_and_scratch"] = per_k
    if probe:
        big = max(probe)
        fts = {m: acc[m][big] for m in ("finetune_layer4", "finetune_all") if big in acc.get(m, {})}
        fitted = acc.get("probe_fitted", {}).get(big)
        out["largest_k"] = big
        out["finetune_minus_probe"] = {
            m: paired_difference(v, fitted) if fitted and len(fitted) == len(v) else difference(v, probe[big])
            for m, v in fts.items()
        }
        if 10 in probe:
            out["probe_k10"] = summarise(probe[10])["mean"]
    return out


# -------------------------------------------------------------------------------------------- write


def _cell(values: list[float] | None) -> str:
    if not values:
        return "-"
    s = summarise(values)
    return f"{s['mean']:.3f} ± {s['half']:.3f}" if s["n"] > 1 else f"{s['mean']:.3f} (1 seed)"


def write_table(run: Path, acc: dict[str, dict[int, list[float]]], n_test: int | None) -> Path:
    ks = sorted({k for v in acc.values() for k in v})
    lines = ["| method | " + " | ".join(f"k={k}" for k in ks) + " | seeds |", "|---|" + "---:|" * len(ks) + "---:|"]
    for method, label in METHODS.items():
        if method in acc:
            seeds = sorted({len(v) for v in acc[method].values()})
            cells = [_cell(acc[method].get(k)) for k in ks]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {'/'.join(map(str, seeds))} |")
    c = claims(acc)
    notes = []
    for m, d in c.get("finetune_minus_probe", {}).items():
        how = "paired by seed with the probe it started from" if d["paired"] else "vs the probe curve"
        notes.append(
            f"* {METHODS[m]} minus the probe at k={c['largest_k']} ({how}): {d['diff']:+.3f} "
            f"(95% interval {d['ci95'][0]:+.3f} .. {d['ci95'][1]:+.3f})"
        )
    bad = [str(k) for k, v in c.get("probe_beats_random_and_scratch", {}).items() if not v["holds"]]
    notes.append(
        "* probe on source features above random features and from scratch (intervals apart) at every k"
        if not bad
        else f"* probe intervals NOT above both rivals' at k = {', '.join(bad)}"
    )
    test = f" on {n_test} test images" if n_test else ""
    text = (
        f"Target task: 3 classes (7/8/9), accuracy{test}; chance = 0.333. k = training images per class.\n"
        "Cells: mean ± half-width of the 95% interval over seeds (k-subset and training seed).\n\n"
        + "\n".join(lines)
        + "\n\n"
        + "\n".join(notes)
        + "\n"
    )
    out = run / "results.md"
    out.write_text(text)
    (run / "results.json").write_text(
        json.dumps(
            {"accuracy": {m: {str(k): v for k, v in by.items()} for m, by in acc.items()}, "claims": c}, indent=2
        )
        + "\n"
    )
    return out


def write_plot(run: Path, acc: dict[str, dict[int, list[float]]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (method, label) in enumerate(METHODS.items()):
        if method not in acc:
            continue
        ks = sorted(acc[method])
        s = [summarise(acc[method][k]) for k in ks]
        xs = [k * (1 + 0.03 * (i - 2)) for k in ks]  # a small offset so the error bars do not overlap
        yerr = [x["half"] if math.isfinite(x["half"]) else 0.0 for x in s]
        ax.errorbar(xs, [x["mean"] for x in s], yerr=yerr, marker="o", ms=4, capsize=3, label=label)
    ax.axhline(1 / 3, color="grey", linestyle=":", label="chance")
    ax.set_xscale("log")
    ticks = sorted({k for v in acc.values() for k in v})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("training images per class")
    ax.set_ylabel("test accuracy (mean, 95% interval over seeds)")
    ax.set_ylim(0, 1.02)
    ax.set_title("offline_digits: 3-class target (digits 7/8/9 on photos)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.text(0.01, 0.01, "bash recipes/offline_digits/run.sh", fontsize=6, color="grey")
    fig.tight_layout()
    out = run / "accuracy_vs_k.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _n_test(run: Path) -> int | None:
    manifest = run / "data" / "manifest.json"
    if not manifest.exists():
        return None
    return sum(json.loads(manifest.read_text())["counts"].get("target/test", {}).values()) or None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print(__doc__.split("Usage::")[1], file=sys.stderr)
        return 2
    run = Path(args[0])
    acc = collect(run)
    if not acc:
        print(f"no results under {run}/curves/ or {run}/eval/", file=sys.stderr)
        return 1
    table = write_table(run, acc, _n_test(run))
    write_plot(run, acc)
    print(table.read_text(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
