"""The head's numpy forward (`rt review` scores a cache without importing torch) equals the torch module's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from planted import identity

from resnet_transfer.head import (
    HEAD_FILE,
    HeadModule,
    head_probabilities,
    load_head_arrays,
    predict_probabilities,
    read_model_dir,
    write_model_dir,
)


@pytest.mark.parametrize("hidden", [0, 7])
def test_numpy_probabilities_equal_the_modules(tmp_path: Path, hidden: int) -> None:
    rng = np.random.default_rng(0)
    X = np.maximum(rng.normal(size=(50, 12)), 0).astype(np.float32)
    torch.manual_seed(0)
    module = HeadModule(12, 4, hidden, dropout=0.3, temperature=1.7)
    with torch.no_grad():  # a standardisation that changes the result
        module.mean.copy_(torch.from_numpy(X.mean(0)))
        module.scale.copy_(torch.from_numpy(1.0 / (X.std(0) + 0.1)))
    config = dict(module.config)
    out = write_model_dir(
        tmp_path / "head", "head", identity(12), list("abcd"), config, {HEAD_FILE: module.state_dict()}
    )
    md = read_model_dir(out)
    got = head_probabilities(load_head_arrays(md.path / HEAD_FILE), md.head_config, X)
    want = predict_probabilities(module, X)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert got.shape == (50, 4) and np.allclose(got.sum(1), 1.0)


def test_the_numpy_forward_does_not_import_torch() -> None:
    code = "import sys, resnet_transfer.head.arrays; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
