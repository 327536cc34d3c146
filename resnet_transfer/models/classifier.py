"""The classifier as one ``nn.Module``: a backbone network and a softmax head, written once.

Everyone who runs "backbone then head" uses this module: `rt finetune` trains it (from images, or from
cached stage maps through the part of the backbone after the cut), `rt predict` / `rt evaluate` run it,
`rt export` traces it with the pixel normalisation inside, and under torchrun it is the module that
``DistributedDataParallel`` wraps. :func:`modeldir.load_classifier` builds one from a head or model directory.

``forward(x)`` is ``head(pooled(x))`` on images, or ``head(rest(x))`` on maps when the classifier was built
with ``rest`` (``Backbone.split(cut)``'s second half). ``pooled`` is the backbone's final pooled features, or,
for a head whose config names ``features`` (stages), the concatenation of those stages' pooled features.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Classifier(nn.Module):
    """Backbone ``net`` + ``head``.

    * ``rest``: maps at a cut -> pooled features; it shares its modules with ``net`` and is deliberately not
      registered (no duplicated parameters or state-dict entries). With it, ``forward`` takes maps.
    * ``normalize``: a ``TransformConfig`` (or anything with ``mean``/``std``): ``forward`` then takes pixels
      in [0, 1] and normalises them itself (the exported graph).
    * ``features``: stage names whose pooled features, concatenated, are the head's input (needs
      ``backbone``, the :class:`~resnet_transfer.backbones.Backbone` that owns ``net``).
    * ``backbone``: kept for callers that need the identity, stages and transform (not registered)."""

    def __init__(
        self,
        net: nn.Module,
        head: nn.Module,
        rest: nn.Module | None = None,
        *,
        normalize: Any = None,
        features: list[str] | None = None,
        backbone: Any = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.head = head
        object.__setattr__(self, "rest", rest)  # shares net's modules: not a second registration
        object.__setattr__(self, "backbone", backbone)
        self.features = list(features) if features else None
        if self.features and backbone is None:
            raise ValueError("a classifier on stage features needs the Backbone that owns net")
        self.normalized = normalize is not None
        if normalize is not None:
            self.register_buffer("mean", torch.tensor(normalize.mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(normalize.std, dtype=torch.float32).view(1, 3, 1, 1))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input for a batch of (normalised) images."""
        if not self.features:
            return self.net(x)
        from ..backbone import pooled_stage_features  # the contract's one forward for several stages

        stages = pooled_stage_features(self.backbone, x, self.features)
        return torch.cat([stages[s] for s in self.features], 1)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images (pixels in [0, 1] when built with ``normalize``)."""
        if self.normalized:
            x = (x - self.mean) / self.std
        return self.head(self.pooled(x))

    def maps(self, m: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of cached maps at the cut (``rest`` required)."""
        if self.rest is None:
            raise ValueError("this classifier was built without `rest`: it takes images, not maps")
        return self.head(self.rest(m))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.images(x) if self.rest is None else self.maps(x)

    # -- the checkpoint's view: backbone and head state apart, on the CPU (the finetune checkpoint format)
    def state(self) -> dict[str, Any]:
        return {
            "backbone": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
            "head": {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()},
        }

    def load(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["backbone"])
        self.head.load_state_dict(state["head"])
