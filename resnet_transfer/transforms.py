"""The image transforms and their config: what a backbone expects its input to look like.

:class:`TransformConfig` is recorded in every cache, head and model directory (inside the backbone
identity), so it imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TransformConfig:
    """The eval preprocessing: resize the short side to ``resize_size``, center-crop ``input_size``,
    scale to [0, 1], normalise with ``mean``/``std``."""

    input_size: int = 224
    resize_size: int = 256
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransformConfig:
        return cls(
            input_size=int(d["input_size"]),
            resize_size=int(d["resize_size"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(x) for x in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d["std"]),  # type: ignore[arg-type]
        )

    def with_size(self, image_size: int) -> TransformConfig:
        """The same crop ratio at another input size (``--image-size``)."""
        ratio = self.input_size / self.resize_size
        return TransformConfig(image_size, max(image_size, round(image_size / ratio)), *self._rest())

    def _rest(self) -> tuple[str, tuple[float, float, float], tuple[float, float, float]]:
        return self.interpolation, self.mean, self.std
