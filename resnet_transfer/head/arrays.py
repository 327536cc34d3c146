"""The head's forward on numpy arrays, without torch: for tools that only score cached features.

``rt review`` computes a head's probabilities for every row of a cache once at start; importing torch for
that would cost it ~3 s and ~500 MB of resident memory. This is the same function as
:meth:`HeadModule.predict_proba` (``softmax(net((x - mean) * scale) / temperature)``, ``net`` a linear layer or
linear -> ReLU -> dropout (identity at inference) -> linear), read from the same ``head.safetensors``;
``tests/test_head_arrays.py`` holds the two equal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .calibration import head_temperature, softmax


def load_head_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a ``head.safetensors`` file as float32 numpy arrays (no torch import)."""
    from safetensors.numpy import load_file

    return {k: np.asarray(v, dtype=np.float32) for k, v in load_file(str(path)).items()}


def head_logits(arrays: dict[str, np.ndarray], config: dict[str, Any], X: np.ndarray) -> np.ndarray:
    """Raw logits of the head whose state is ``arrays`` and whose recorded config is ``config``."""
    z = (np.asarray(X, dtype=np.float32) - arrays["mean"]) * arrays["scale"]
    if int(config.get("hidden", 0)):
        z = np.maximum(z @ arrays["net.0.weight"].T + arrays["net.0.bias"], 0.0)
        return z @ arrays["net.3.weight"].T + arrays["net.3.bias"]
    return z @ arrays["net.weight"].T + arrays["net.bias"]


def head_probabilities(arrays: dict[str, np.ndarray], config: dict[str, Any], X: np.ndarray) -> np.ndarray:
    """Calibrated probabilities: ``softmax(logits / temperature)`` (float64, rows sum to 1)."""
    return softmax(head_logits(arrays, config, X), head_temperature(config))
