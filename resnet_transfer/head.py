"""The softmax head: a torch module (used by predict and finetune) and, built around it, an estimator.

``HeadModule`` is the contract shared by every consumer: ``(x - mean) * scale`` (feature standardisation
stored as buffers, identity by default), then a linear layer, or ``hidden`` -> ReLU -> dropout -> linear
for an MLP. Its ``config`` dict is what model directories record under ``head``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class HeadModule(nn.Module):
    """Standardise, then linear (or a one-hidden-layer MLP) to ``num_classes`` logits."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.hidden = int(hidden)
        self.dropout = float(dropout)
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("scale", torch.ones(in_features))
        if hidden:
            self.net: nn.Module = nn.Sequential(
                nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
            )
        else:
            self.net = nn.Linear(in_features, num_classes)

    @property
    def config(self) -> dict[str, Any]:
        return {
            "type": "mlp" if self.hidden else "linear",
            "in_features": self.in_features,
            "num_classes": self.num_classes,
            "hidden": self.hidden,
            "dropout": self.dropout,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x.float() - self.mean) * self.scale)


def build_head_module(config: dict[str, Any]) -> HeadModule:
    """A fresh :class:`HeadModule` from a recorded ``config`` (load its state dict afterwards)."""
    return HeadModule(
        int(config["in_features"]),
        int(config["num_classes"]),
        int(config.get("hidden", 0)),
        float(config.get("dropout", 0.0)),
    )
