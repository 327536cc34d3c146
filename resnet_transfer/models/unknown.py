""" "None of the above" where a model is used: the out-of-distribution score of `rt predict`'s rows, `rt evaluate
--ood`, and the scorer inside the exported graph (the scorers themselves: head/ood.py, stored by ood_store.py).

* `rt predict`: every row gets ``ood_score`` (higher = farther from the training data) and ``unknown`` (the
  score above the stored threshold, or ``--ood-threshold``); ``--reject-unknown`` makes ``prediction`` say
  ``unknown``. A directory without scorers (written before them) predicts as before, without the two fields.
* `rt evaluate --ood DIR`: AUROC and FPR at 95% TPR of every stored scorer, side by side with max-softmax, the
  accuracy on the in-distribution images the chosen scorer accepts, and ``ood_scores.png``.
* `rt export --format onnx`: the classifier gets the chosen scorer as a second output, ``ood_score``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..base import UsageError, get_reporter
from ..head import read_ood, require_ood

UNKNOWN = "unknown"
ONNX_MAX_BANK_BYTES = 1.5e9  # a kNN bank above this does not fit one ONNX protobuf (2 GB) with the network


def load_scorer(md: Any, cfg: Any) -> Any:
    """The directory's scorers for `rt predict` (``None`` where it has none and no option needs one)."""
    needs = [o for o, v in (("--reject-unknown", cfg.reject_unknown), ("--ood-threshold", cfg.ood_threshold)) if v]
    needs += ["--ood-scorer"] if cfg.ood_scorer else []
    if needs:
        model = require_ood(md.path, md.meta, needs[0])
        model.name(cfg.ood_scorer)  # an unknown name fails before any image is read
        return model
    return read_ood(md.path, md.meta)


def head_logits(head: Any, X: np.ndarray) -> np.ndarray:
    from ..head import predict_logits

    return predict_logits(head.cpu(), np.asarray(X, dtype=np.float32))


def mark_unknown(rows: list[dict[str, Any]], ood: Any, X: np.ndarray, head: Any, cfg: Any) -> int:
    """Give every row its ``ood_score`` and ``unknown`` verdict (``X``: the rows' head input features); with
    ``cfg.reject_unknown`` the ``prediction`` of an unknown row is ``"unknown"``. Returns how many are unknown."""
    if ood is None or not rows:
        return 0
    scores = ood.score(X, head_logits(head, X), cfg.ood_scorer)
    threshold = ood.threshold(cfg.ood_scorer) if cfg.ood_threshold is None else float(cfg.ood_threshold)
    n = 0
    for r, s in zip(rows, scores):
        r["ood_score"] = float(s)
        r["unknown"] = bool(s > threshold)
        n += r["unknown"]
        if r["unknown"] and cfg.reject_unknown:
            r.setdefault("guess", r["prediction"])
            r["prediction"] = UNKNOWN
    if n:
        get_reporter().info(
            f"{n} of {len(rows)} image(s) look unlike the training data ({ood.name(cfg.ood_scorer)} score above "
            f"{threshold:.4g})"
        )
    return n


def unknown_inputs(cfg: Any, md: Any) -> tuple[np.ndarray, np.ndarray]:
    """Features and logits of ``cfg.ood`` (a cache of the same backbone, or images run through the model)."""
    from ..head import HEAD_FILE, build_head_module, head_features, unknown_features

    path = Path(cfg.ood)
    stage = head_features(md.head_config)
    if path.is_file() and path.suffix in (".h5", ".hdf5"):
        head = build_head_module(md.head_config)
        head.load_state_dict(md.load_tensors(HEAD_FILE))
        X = unknown_features(path, md.identity, stage)
    else:
        from .loading import load_classifier

        clf, _ = load_classifier(cfg.model_dir, getattr(cfg, "weights", None))
        head = clf.head
        pooled = clf.pooled if clf.features else None
        X = unknown_features(path, md.identity, stage, backbone=clf.backbone, pooled=pooled, precision=cfg.precision)
    return X, head_logits(head, X)


def ood_evaluation(
    cfg: Any, md: Any, X: np.ndarray, logits: np.ndarray, y: np.ndarray, out: str | Path | None
) -> dict[str, Any]:
    """The ``"ood"`` part of `rt evaluate --ood`'s report (see the module docstring)."""
    from ..base import ood_metrics

    ood = require_ood(md.path, md.meta, "--ood")
    chosen = ood.name(cfg.ood_scorer)
    X_u, z_u = unknown_inputs(cfg, md)
    s_in = {n: ood.score(X, logits, n) for n in ood.scorers}
    s_out = {n: ood.score(X_u, z_u, n) for n in ood.scorers}
    per = {n: ood_metrics(s_in[n], s_out[n]) for n in ood.scorers}
    accepted = s_in[chosen] <= ood.threshold(chosen)
    pred = np.asarray(logits).argmax(1)
    report: dict[str, Any] = {
        "scorer": chosen,
        "auroc": per[chosen]["auroc"],
        "fpr_at_95_tpr": per[chosen]["fpr_at_95_tpr"],
        "threshold": ood.threshold(chosen),
        "accepted_in_distribution": float(accepted.mean()),
        "unknown_rejected": float((s_out[chosen] > ood.threshold(chosen)).mean()),
        "accuracy_accepted": float((pred[accepted] == y[accepted]).mean()) if accepted.any() else None,
        "accuracy_all": float((pred == y).mean()),
        "n_in": len(y),
        "n_out": len(X_u),
        "unknown_source": str(cfg.ood),
        "scorers": {n: {k: m[k] for k in ("auroc", "fpr_at_95_tpr")} for n, m in per.items()},
    }
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        report["plot"] = str(plot_score_histograms(s_in, s_out, Path(out) / "ood_scores.png", f"{md.path.name}"))
    return report


def plot_score_histograms(in_scores: dict[str, Any], out_scores: dict[str, Any], path: Path, title: str) -> Path:
    """One panel per scorer: the histograms of its scores on the known classes' images and the unknown ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..base import save_png

    names = list(in_scores)
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        a, b = np.asarray(in_scores[name], float), np.asarray(out_scores[name], float)
        bins = np.histogram_bin_edges(np.r_[a, b], bins=30)
        ax.hist(a, bins=bins, alpha=0.6, density=True, label="known classes")
        ax.hist(b, bins=bins, alpha=0.6, density=True, label="unknown (--ood)")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("score (higher = farther)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"out-of-distribution scores: {title}", fontsize=10)
    try:
        return save_png(fig, path)
    finally:
        plt.close(fig)


def ood_summary_lines(ood: dict[str, Any] | None) -> list[str]:
    """What `rt evaluate` prints for ``report["ood"]`` (nothing without it)."""
    if not ood:
        return []
    cols = "  ".join(f"{n} {m['auroc']:.3f}/{m['fpr_at_95_tpr']:.3f}" for n, m in ood["scorers"].items())
    acc = ood["accuracy_accepted"]
    lines = [
        f"out-of-distribution ({ood['scorer']}): AUROC {ood['auroc']:.4f}, FPR at 95% TPR {ood['fpr_at_95_tpr']:.4f} "
        f"({ood['n_in']} known vs {ood['n_out']} unknown images)",
        f"  per scorer, AUROC/FPR95: {cols}",
        f"  accepted {ood['accepted_in_distribution']:.1%} of the known images (accuracy "
        + (f"{acc:.4f}" if acc is not None else "-")
        + f" vs {ood['accuracy_all']:.4f} on all), rejected {ood['unknown_rejected']:.1%} of the unknown",
    ]
    if ood.get("plot"):
        lines.append(f"  score histograms: {ood['plot']}")
    return lines


# ------------------------------------------------------------------------------------- the exported graph


def scored_classifier(model: Any, md: Any, fmt: str = "onnx") -> tuple[Any, dict[str, Any]]:
    """``(module, sidecar entry)``: the classifier with the chosen scorer as a second output where the graph
    can carry it (ONNX: outputs are named, so readers of ``logits`` are unaffected), else the classifier alone
    and the sidecar's reason."""
    ood = read_ood(md.path, md.meta)
    if ood is None:
        return model, {"in_graph": False, "why": f"{md.path} has no out-of-distribution scorer"}
    if fmt != "onnx":
        why = f"--format {fmt} keeps its one output (logits); --format onnx adds ood_score"
        return model, {"in_graph": False, "scorer": ood.scorer, "threshold": ood.threshold(), "why": why}
    name = ood.scorer
    scorer = ood.scorers[name]
    bank = getattr(scorer, "bank_", None)
    if bank is not None and bank.nbytes > ONNX_MAX_BANK_BYTES:
        why = f"the kNN bank ({bank.nbytes / 1e9:.1f} GB) is too large for one ONNX file: score with `rt predict`"
        return model, {"in_graph": False, "scorer": name, "threshold": ood.threshold(), "why": why}
    entry = {
        "in_graph": True,
        "scorer": name,
        "output": "ood_score",
        "threshold": ood.threshold(),
        "meaning": "higher = farther from the training data; above the threshold: unknown",
        "describe": scorer.describe,
    }
    kind, buffers, k = _torch_scorer(scorer)
    return _module()(model, kind, buffers, k).eval(), entry


def _torch_scorer(scorer: Any) -> Any:
    import torch

    name = scorer.name
    if name == "knn":
        bank = torch.from_numpy(np.asarray(scorer.bank_, np.float16))
        return ("knn", {"bank": bank}, int(scorer.k))
    if name == "mahalanobis":
        P = torch.from_numpy(scorer.precision_.astype(np.float32))
        M = torch.from_numpy(scorer.means_.astype(np.float32))
        return ("mahalanobis", {"P": P, "M": M, "m": torch.einsum("cd,de,ce->c", M, P, M)}, 0)
    if name in ("energy", "msp"):
        return (name, {}, 0)
    raise UsageError(f"out-of-distribution scorer {name!r} cannot be exported")


def _module() -> Any:
    import torch
    from torch import nn

    class _Scored(nn.Module):
        """logits and the out-of-distribution score of one scorer, in torch ops that export to ONNX."""

        def __init__(self, clf: Any, kind: str, buffers: dict[str, Any], k: int) -> None:
            super().__init__()
            self.clf, self.kind, self.k = clf, kind, k
            for n, t in buffers.items():
                self.register_buffer(n, t)

        def forward(self, x: Any) -> tuple[Any, Any]:
            clf = self.clf
            if clf.normalized:
                x = (x - clf.mean) / clf.std
            f = clf.pooled(x).float()
            z = clf.head(f)
            if self.kind == "knn":
                u = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
                sim = torch.topk(u @ self.bank.float().T, self.k, dim=1).values[:, self.k - 1]
                s = torch.sqrt(torch.clamp(2.0 - 2.0 * sim, min=0.0))
            elif self.kind == "mahalanobis":
                fp = f @ self.P
                d = (fp * f).sum(1, keepdim=True) - 2.0 * fp @ self.M.T + self.m
                s = torch.clamp(d.min(1).values, min=0.0)
            elif self.kind == "energy":
                s = -torch.logsumexp(z.float(), 1)
            else:
                s = 1.0 - torch.softmax(z.float(), 1).max(1).values
            return z, s

    return _Scored
