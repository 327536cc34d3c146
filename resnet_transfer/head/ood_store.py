"""Fitting every out-of-distribution scorer of :mod:`.ood` beside a head, choosing one, and storing them.

`rt fit-head` and `rt finetune` call :func:`fit_ood` with the head's features of the training rows (and of the
validation rows, on which each scorer's threshold accepts 95%); given features of a few images of the unknown
(``--ood``) the scorer that separates them best from the validation rows is kept, else :data:`DEFAULT_SCORER`.

In the head/model directory (format in docs/heads.md): ``ood.safetensors`` holds every scorer's arrays as
``<scorer>.<name>`` (the kNN bank in float16, the Mahalanobis class means and precision matrix); ``meta.json``
holds ``"ood"``: ``{"version", "scorer", "threshold", "accept", "file", "chosen_by", "scorers": {name:
{"threshold", "params"}}, "fitted_on", "threshold_on"}``. A directory without it (written before scorers
existed) still predicts; :func:`read_ood` gives ``None`` for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..base import ModelDirError, UsageError, get_reporter
from .ood import ACCEPT, SCORERS, Scorer, accept_threshold, make_scorer

OOD_FILE = "ood.safetensors"
OOD_VERSION = 1
DEFAULT_SCORER = "knn"
NO_SCORER_HINT = "re-run `rt fit-head` (or `rt finetune`) with this version to fit one"


@dataclass
class OodModel:
    """Fitted scorers with their thresholds; ``scorer``: the one a prediction uses unless told otherwise."""

    scorers: dict[str, Scorer]
    thresholds: dict[str, float]
    scorer: str = DEFAULT_SCORER
    info: dict[str, Any] = field(default_factory=dict)  # how it was fitted and chosen (meta.json's "ood")

    def name(self, scorer: str | None = None) -> str:
        name = scorer or self.scorer
        if name not in self.scorers:
            raise UsageError(
                f"--ood-scorer {name!r}: not one of this head's scorers", f"use one of {', '.join(self.scorers)}"
            )
        return name

    def score(self, features: Any, logits: np.ndarray | None, scorer: str | None = None) -> np.ndarray:
        return self.scorers[self.name(scorer)].score(features, logits)

    def threshold(self, scorer: str | None = None) -> float:
        return self.thresholds[self.name(scorer)]

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(arrays for ood.safetensors, the "ood" entry of meta.json)``."""
        arrays: dict[str, np.ndarray] = {}
        entries: dict[str, Any] = {}
        for name, s in self.scorers.items():
            params, arr = s.state()
            arrays.update({f"{name}.{k}": np.ascontiguousarray(v) for k, v in arr.items()})
            entries[name] = {"threshold": self.thresholds[name], "params": params}
        meta = {
            "version": OOD_VERSION,
            "scorer": self.scorer,
            "threshold": self.thresholds[self.scorer],
            "accept": ACCEPT,
            "file": OOD_FILE,
            "scorers": entries,
            **{k: v for k, v in self.info.items() if k not in ("scorer", "threshold", "scorers")},
        }
        return arrays, meta


def fit_ood(
    X_train: Any,
    y_train: np.ndarray,
    logits_train: np.ndarray,
    X_val: Any | None,
    logits_val: np.ndarray | None,
    *,
    unknown: tuple[Any, np.ndarray] | None = None,
    search: str = "auto",
    names: tuple[str, ...] = tuple(SCORERS),
) -> tuple[OodModel, dict[str, Any]]:
    """Fit every scorer on the training rows, set each threshold to accept ``ACCEPT`` of the validation rows
    (without them: of the training rows, the kNN leaving each row out), and choose one (by ``unknown`` =
    ``(features, logits)`` of images of none of the classes, when given). Returns the model and its report."""
    rep = get_reporter()
    scorers = {n: make_scorer(n, search=search) if n == "knn" else make_scorer(n) for n in names}
    on_val = X_val is not None and logits_val is not None and len(X_val) > 0
    thresholds, val_scores = {}, {}
    for name, s in scorers.items():
        s.fit(X_train, y_train)
        if on_val:
            val_scores[name] = s.score(X_val, logits_val)
        elif hasattr(s, "score_training"):
            val_scores[name] = s.score_training()
        else:
            val_scores[name] = s.score(X_train, logits_train)
        thresholds[name] = accept_threshold(val_scores[name])
    where = f"{len(X_val)} validation rows" if on_val else f"{len(y_train)} training rows (no validation rows)"
    info: dict[str, Any] = {"fitted_on": f"{len(y_train)} training rows", "threshold_on": where}
    report: dict[str, Any] = {**info, "thresholds": thresholds}
    chosen = DEFAULT_SCORER if DEFAULT_SCORER in scorers else next(iter(scorers))
    info["chosen_by"] = f"the default ({chosen}): no images of the unknown given (--ood)"
    if unknown is not None and len(unknown[0]):
        chosen, report["unknown"] = _choose(scorers, val_scores, unknown, chosen)
        info["chosen_by"] = report["unknown"]["why"]
    model = OodModel(scorers, thresholds, chosen, info)
    report.update(scorer=chosen, threshold=thresholds[chosen], chosen_by=info["chosen_by"])
    rep.info(
        f"out-of-distribution score: {chosen} (threshold {thresholds[chosen]:.4g} accepts {ACCEPT:.0%} of the "
        f"{where}); {info['chosen_by']}"
    )
    return model, report


def _choose(
    scorers: dict[str, Scorer], val_scores: dict[str, np.ndarray], unknown: tuple[Any, np.ndarray], default: str
) -> tuple[str, dict[str, Any]]:
    """The scorer with the highest AUROC between the validation rows and the unknown (ties: the default)."""
    from ..base import ood_metrics

    X_u, z_u = unknown
    per = {n: ood_metrics(val_scores[n], s.score(X_u, z_u)) for n, s in scorers.items()}
    best = max(per, key=lambda n: (round(per[n]["auroc"], 6), n == default))
    table = ", ".join(f"{n} {m['auroc']:.3f}" for n, m in per.items())
    why = (
        f"separates the {len(X_u)} images of the unknown (--ood) from the validation rows best: AUROC {table}"
        if best != default or per[best]["auroc"] > min(m["auroc"] for m in per.values())
        else f"the default ({default}): the scorers tie on the {len(X_u)} images of the unknown (AUROC {table})"
    )
    return best, {"n": len(X_u), "scorers": per, "why": why}


def read_ood(path: str | Path, meta: dict[str, Any]) -> OodModel | None:
    """The scorers stored in the head/model directory ``path`` (whose parsed meta.json is ``meta``), or
    ``None`` for a directory written without them. Reads numpy arrays only (no torch)."""
    entry = meta.get("ood")
    if not entry:
        return None
    f = Path(path) / str(entry.get("file", OOD_FILE))
    try:
        from safetensors.numpy import load_file

        arrays = load_file(str(f))
        scorers, thresholds = {}, {}
        for name, e in entry["scorers"].items():
            own = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.split(".", 1)[0] == name}
            scorers[name] = SCORERS[name].from_state(dict(e.get("params") or {}), own)
            thresholds[name] = float(e["threshold"])
        info = {k: v for k, v in entry.items() if k not in ("scorers",)}
        return OodModel(scorers, thresholds, str(entry["scorer"]), info)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ModelDirError(
            f"{f}: the out-of-distribution scorers are unreadable ({type(exc).__name__}: {exc})",
            "restore the file, or re-run the command that wrote the directory",
        ) from exc


def require_ood(path: str | Path, meta: dict[str, Any], what: str) -> OodModel:
    """:func:`read_ood`, or an error naming ``what`` needed it when the directory has no scorer."""
    model = read_ood(path, meta)
    if model is None:
        raise UsageError(
            f"{what}: {path} has no out-of-distribution scorer (written before rt had them)", NO_SCORER_HINT
        )
    return model


def ood_tensors(model: OodModel) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """What :func:`write_model_dir` takes: ``({OOD_FILE: torch tensors}, {"ood": meta entry})``."""
    import torch

    arrays, meta = model.state()
    return {OOD_FILE: {k: torch.from_numpy(v) for k, v in arrays.items()}}, {"ood": meta}
