"""What `rt compare` concludes and writes: the recommendation with its measured reason, ``compare.json``,
``compare.md`` (the table) and ``compare.png`` (accuracy against extract speed with the Pareto front; the
label-efficiency curves beside it).

The recommendation is the cheapest candidate (most extract images/s on this host; rates within 10% of the
fastest count as equal, the more accurate of them wins) whose interval overlaps the most accurate one's. Where it is not the most accurate, the paired difference over the same seeds (the
same k-subsets) says whether the two are tied: its 95% t-interval holds 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..base import atomic_write_json, atomic_write_text, get_reporter, save_png

SAME_SPEED = 0.10  # extract rates this close (relative) count as the same cost


def _pm(row: dict[str, Any]) -> str:
    lo, hi = row["interval"]
    return f"{row['accuracy']:.3f} +- {(hi - lo) / 2:.3f}"


def _rate(row: dict[str, Any]) -> float:
    return float(row.get("images_per_second") or 0.0)


def _spec(row: dict[str, Any]) -> str:
    return row["candidate"].spec


def paired_difference(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a - b`` per seed at the headline k (the same subsets for both): mean and 95% t-interval."""
    from .curves import t_interval

    sa, sb = a["curve"][-1]["scores"], b["curve"][-1]["scores"]
    diffs = [x - y for x, y in zip(sa, sb)]
    mean, lo, hi = t_interval(diffs)
    lo = mean if lo is None else lo
    hi = mean if hi is None else hi
    return {"of": [_spec(a), _spec(b)], "difference": mean, "interval": [lo, hi], "tied": bool(lo <= 0 <= hi)}


def recommend(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"recommended": spec | None, "reason": sentence, "paired": ...}`` from the scored rows."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return {"recommended": None, "reason": "no candidate could be extracted: see each one's error and hint"}
    best = max(ok, key=lambda r: r["accuracy"])
    lo_best = best["interval"][0]
    within = [r for r in ok if r["interval"][1] >= lo_best]
    fastest = max(_rate(r) for r in within)
    # speeds within SAME_SPEED of the fastest are one cost (one run's noise on a shared host; the same
    # network with other weights): among them the more accurate
    cheap = [r for r in within if _rate(r) >= (1 - SAME_SPEED) * fastest]
    rec = max(cheap, key=lambda r: (r["accuracy"], _rate(r)))
    if len(ok) == 1:
        return {"recommended": _spec(rec), "reason": f"{_spec(rec)}: the only candidate that ran ({_pm(rec)})"}
    if rec is best:
        others = sorted((r for r in ok if r is not best), key=lambda r: -r["accuracy"])
        nxt = others[0]
        paired = paired_difference(best, nxt)
        if len(within) > 1:
            why = (
                f"the most accurate ({_pm(best)}); none of the {len(within) - 1} other(s) within its interval is "
                f"more than {SAME_SPEED:.0%} faster"
            )
        else:
            why = f"the most accurate ({_pm(best)}); the next, {_spec(nxt)} ({_pm(nxt)}), is outside its interval"
        why += f"; paired difference to {_spec(nxt)} {_paired_text(paired)}"
        return {"recommended": _spec(rec), "reason": f"{_spec(rec)}: {why}", "paired": paired}
    paired = paired_difference(rec, best)
    speed = _rate(rec) / _rate(best) if _rate(best) > 0 else float("inf")
    reason = (
        f"{_spec(rec)}: within the interval of {_spec(best)} ({_pm(rec)} vs {_pm(best)}) at {speed:.1f}x its speed; "
        f"paired difference {_paired_text(paired)}"
    )
    return {"recommended": _spec(rec), "reason": reason, "paired": paired}


def _paired_text(p: dict[str, Any]) -> str:
    lo, hi = p["interval"]
    verdict = "holds 0: tied" if p["tied"] else "excludes 0"
    return f"{p['difference']:+.3f} (95% interval {lo:+.3f} .. {hi:+.3f}, {verdict})"


# ------------------------------------------------------------------------------------------------ outputs


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The comparison as table columns and rows (one per candidate, errors included)."""
    cols = ["candidate", f"accuracy k={report['k']} (95%)", "LogME", "img/s", "params", "features", "cache", "computed"]
    rows = []
    for c in report["candidates"]:
        mark = " *" if c["spec"] == report["recommended"] else ""
        if c.get("error"):
            rows.append([c["spec"] + mark, f"error: {c['error']}", "-", "-", "-", "-", "-", "0"])
            continue
        lo, hi = c["interval"]
        rate = "-" if c["images_per_second"] is None else f"{c['images_per_second']:.1f}"
        if c["computed"] == 0 and c["images_per_second"] is not None:
            rate += " (cached)"
        rows.append(
            [
                c["spec"] + mark,
                f"{c['accuracy']:.3f} ({lo:.3f} - {hi:.3f})",
                f"{c['logme']:.3f}",
                rate,
                f"{c['parameters'] / 1e6:.1f}M",
                str(c["feature_size"]),
                _size(c["cache_bytes"]),
                str(c["computed"]),
            ]
        )
    return cols, rows


def _markdown(report: dict[str, Any]) -> str:
    cols, rows = table(report)
    lines = [
        f"# rt compare: {len(report['candidates'])} candidates on {report['n_train']} training / "
        f"{report['n_test']} test images",
        "",
        f"Probe test accuracy at k={report['k']} images per class: mean and 95% t-interval over "
        f"{report['seeds']} seeds (the same k-subsets for every candidate; split: {report['split']['kind']}). "
        "img/s: `rt extract` on this host ('cached': the rate recorded when the cache was computed). * recommended.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        f"**Recommended**: {report['reason']}",
    ]
    errors = [c for c in report["candidates"] if c.get("error")]
    if errors:
        lines += ["", "Candidates that did not run:", ""]
        lines += [f"- `{c['spec']}`: {c['error']} (fix: {c['hint']})" for c in errors]
    return "\n".join(lines) + "\n"


def write_outputs(report: dict[str, Any], out: Path, plot: bool = True) -> list[Path]:
    """``compare.json``, ``compare.md`` and (``plot``) ``compare.png`` under ``out``, each written atomically;
    the table goes to the reporter."""
    cols, rows = table(report)
    get_reporter().table(f"rt compare (k={report['k']}, {report['seeds']} seeds, 95% t-interval)", cols, rows)
    files = [atomic_write_json(out / "compare.json", report), atomic_write_text(out / "compare.md", _markdown(report))]
    if plot and any(not c.get("error") for c in report["candidates"]):
        files.append(plot_compare(report, out / "compare.png"))
    return files


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (faster and more accurate), by speed."""
    front = [
        i
        for i, (x, y) in enumerate(points)
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for x2, y2 in points)
    ]
    return sorted(front, key=lambda i: points[i][0])


def plot_compare(report: dict[str, Any], path: Path) -> Path:
    """Left: accuracy against extract images/s (log) with 95% error bars and the Pareto front; right: the
    label-efficiency curves."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ok = [c for c in report["candidates"] if not c.get("error")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    try:
        pts = [(c["images_per_second"] or 0.0, c["accuracy"]) for c in ok]
        for c, (x, y) in zip(ok, pts):
            lo, hi = c["interval"]
            star = c["spec"] == report["recommended"]
            left.errorbar(
                [x],
                [y],
                yerr=[[y - lo], [hi - y]],
                marker="*" if star else "o",
                ms=12 if star else 6,
                capsize=3,
                label=c["spec"],
            )
        front = pareto_front(pts)
        left.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, alpha=0.6, label="Pareto front")
        xs = [x for x, _ in pts]
        if min(xs) > 0 and max(xs) / min(xs) > 10:  # a wide range of speeds: log axis
            left.set_xscale("log")
            left.xaxis.set_major_formatter(ScalarFormatter())
            left.xaxis.set_minor_formatter(NullFormatter())
        left.set_xlabel("rt extract images/s on this host")
        left.set_ylabel(f"probe test accuracy, k={report['k']}")
        left.set_title(f"recommended: {report['recommended']}", fontsize=9)
        left.grid(alpha=0.3)
        left.legend(fontsize=7)
        for c in ok:
            pts_c = [r for r in c["curve"] if r["k"] != "all"]
            if not pts_c:
                continue
            xs = [r["k"] for r in pts_c]
            ys = [r["mean"] for r in pts_c]
            err = [
                [r["mean"] - (r["low"] if r["low"] is not None else r["mean"]) for r in pts_c],
                [(r["high"] if r["high"] is not None else r["mean"]) - r["mean"] for r in pts_c],
            ]
            right.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=c["spec"])
        right.set_xscale("log")
        right.minorticks_off()
        ks = sorted({r["k"] for c in ok for r in c["curve"] if r["k"] != "all"})
        right.set_xticks(ks, [str(k) for k in ks])
        for ax in (left, right):
            ax.set_ylim(max(-0.02, ax.get_ylim()[0]), min(1.02, ax.get_ylim()[1]))
        right.set_xlabel("labelled images per class (k)")
        right.set_ylabel(f"test accuracy ({report['n_test']} images)")
        right.set_title(f"label-efficiency curves, {report['seeds']} seeds, 95% t-interval", fontsize=9)
        right.grid(alpha=0.3)
        right.legend(fontsize=7)
        return save_png(fig, path)
    finally:
        plt.close(fig)
