"""The softmax head: the torch module every consumer runs, and (lazily) the estimator that fits it.

``HeadModule`` is the contract shared by predict, finetune and export: ``(x - mean) * scale`` (feature
standardisation stored as buffers, identity by default), then a linear layer, or ``hidden`` -> ReLU ->
dropout -> linear for an MLP; with ``norm="batch"`` the MLP is fastai's head on pooled features
(BatchNorm -> dropout/2 -> linear -> ReLU -> BatchNorm -> dropout -> linear). Its ``forward`` gives the raw logits (what finetune trains through);
:meth:`HeadModule.predict_proba` divides them by the fitted ``temperature`` before the softmax (what
predict and evaluate report). Its ``config`` dict is what model directories record under ``head``:
``type``, ``in_features``, ``num_classes``, ``hidden``, ``dropout``, and, when they differ from the
defaults, ``norm`` ("none"), ``temperature`` (1.0) and ``features`` (the pooled stages the head reads; absent = the
backbone's final pooled features).

:class:`SoftmaxHead`, the scikit-learn estimator that fits it, is in ``estimator.py`` (its numerics in
``solvers.py``); this module imports no scikit-learn, so commands that only run a head (predict, export,
finetune) do not pay its import time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

NORMS = ("none", "batch")


class _BatchNorm1d(nn.BatchNorm1d):
    """BatchNorm that uses its running statistics for a batch of one row in training (a batch statistic of
    one row is undefined), e.g. the last minibatch of a finetuning epoch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)


def _batch_mlp(in_features: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        _BatchNorm1d(in_features),
        nn.Dropout(dropout / 2),
        nn.Linear(in_features, hidden, bias=False),
        nn.ReLU(),
        _BatchNorm1d(hidden),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


class HeadModule(nn.Module):
    """Standardise, then linear (or a one-hidden-layer MLP) to ``num_classes`` logits.

    ``temperature`` (> 0) divides the logits in :meth:`predict_proba` only; ``features`` names the pooled
    stages whose concatenation is the input (``None``: the backbone's final pooled features). Neither is a
    tensor: both live in :attr:`config`, so state dicts of older heads load unchanged."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int = 0,
        dropout: float = 0.0,
        *,
        norm: str = "none",
        temperature: float = 1.0,
        features: list[str] | None = None,
    ) -> None:
        super().__init__()
        if norm not in NORMS or (norm == "batch" and not hidden):
            raise ValueError(f"norm={norm!r}: use one of {NORMS} ('batch' needs hidden > 0)")
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.hidden = int(hidden)
        self.dropout = float(dropout)
        self.norm = norm
        self.temperature = float(temperature)
        self.features = list(features) if features else None
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("scale", torch.ones(in_features))
        if norm == "batch":
            self.net: nn.Module = _batch_mlp(in_features, hidden, num_classes, dropout)
        elif hidden:
            self.net = nn.Sequential(
                nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
            )
        else:
            self.net = nn.Linear(in_features, num_classes)

    @property
    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "type": "mlp" if self.hidden else "linear",
            "in_features": self.in_features,
            "num_classes": self.num_classes,
            "hidden": self.hidden,
            "dropout": self.dropout,
        }
        if self.norm != "none":
            cfg["norm"] = self.norm
        if self.temperature != 1.0:
            cfg["temperature"] = self.temperature
        if self.features:
            cfg["features"] = list(self.features)
        return cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw logits (no temperature): what training and finetuning optimise."""
        return self.net((x.float() - self.mean) * self.scale)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities: ``softmax(logits / temperature)``."""
        return torch.softmax(self.forward(x).float() / self.temperature, 1)


def build_head_module(config: dict[str, Any]) -> HeadModule:
    """A fresh :class:`HeadModule` from a recorded ``config`` (load its state dict afterwards)."""
    return HeadModule(
        int(config["in_features"]),
        int(config["num_classes"]),
        int(config.get("hidden", 0)),
        float(config.get("dropout", 0.0)),
        norm=str(config.get("norm") or "none"),
        temperature=float(config.get("temperature") or 1.0),
        features=config.get("features") or None,
    )


def predict_logits(module: nn.Module, X: np.ndarray, batch: int = 65536) -> np.ndarray:
    """Logits of ``module`` for the rows of ``X`` (float32, in batches, no grad). A linear head folds
    its standardisation into the weights (``X (W*s)^T + b - (W*s) m``), so X is never copied."""
    module.eval()
    out = []
    with torch.no_grad():
        lin = module.net if isinstance(module.net, nn.Linear) else None
        if lin is not None:
            Ws = lin.weight * module.scale
            c = lin.bias - Ws @ module.mean
        for i in range(0, len(X), batch):
            xb = torch.from_numpy(np.ascontiguousarray(X[i : i + batch], dtype=np.float32))
            out.append((torch.addmm(c, xb, Ws.T) if lin is not None else module(xb)).numpy())
    return np.concatenate(out) if out else np.zeros((0, module.num_classes), np.float32)


def set_standardisation(
    module: nn.Module, X: np.ndarray | None, mean: np.ndarray | None = None, std: np.ndarray | None = None
) -> None:
    """mean/scale buffers from the training rows (or given ``mean``/``std``); constant features get scale 0.

    Stds are floored at a tenth of the median std: a nearly dead channel (common in random or partly
    trained backbones) would otherwise get a scale in the thousands, and once finetuning moves the features,
    the logits explode. The floor only tempers those outliers; typical features are standardised as usual."""
    if X is not None:  # numpy's row-wise accumulation is ~50x faster here than torch's column reductions
        mean = X.sum(0).astype(np.float64) / len(X)
        sq = np.einsum("ij,ij->j", X, X).astype(np.float64) / len(X)
        std = np.sqrt(np.maximum(sq - mean**2, 0.0))
    assert mean is not None and std is not None
    tiny = 1e-6 * max(float(std.max()), 1e-12)
    live = std[std > tiny]
    floor = 0.1 * float(np.median(live)) if live.size else tiny
    scale = np.where(std > tiny, 1.0 / np.maximum(std, floor), 0.0)
    module.mean.copy_(torch.from_numpy(mean.astype(np.float32)))
    module.scale.copy_(torch.from_numpy(scale.astype(np.float32)))


def predict_probabilities(module: HeadModule, X: np.ndarray, batch: int = 65536) -> np.ndarray:
    """Calibrated probabilities (``softmax(logits / module.temperature)``) for the rows of ``X``."""
    logits = torch.from_numpy(predict_logits(module, X, batch))
    return torch.softmax(logits / float(getattr(module, "temperature", 1.0)), 1).numpy()
