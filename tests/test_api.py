"""The Python API as the README shows it: its "From Python" block runs as written, end to end, offline.

The block uses `resnet18` with its default (ImageNet) weights. No network is reachable, so the test puts a
checkpoint it makes itself (random init, timm's layout) where the Hugging Face hub cache keeps
`timm/resnet18.a1_in1k`, exactly as a machine that downloaded it once would have it; the library's
offline-first look-up finds it there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_image_folder

ROOT = Path(__file__).resolve().parents[1]


def _readme_python_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## From Python", 1)[1]
    m = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert m, "README.md's From Python section has no python block"
    return m.group(1)


def _populate_hf_cache(hf_home: Path, repo: str = "timm/resnet18.a1_in1k") -> Path:
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False)  # the hub file keeps its 1000-way classifier
    rev = "0" * 40
    repo_dir = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(rev)
    path = snap / "model.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def test_readme_python_block_runs_as_written(tmp_path: Path) -> None:
    block = _readme_python_block()
    assert len([line for line in block.splitlines() if line.strip()]) <= 14  # "about ten lines"
    make_image_folder(tmp_path / "pets", per_class=6, seed=1)
    make_image_folder(tmp_path / "pets-test", per_class=3, seed=2)
    _populate_hf_cache(tmp_path / "hf")
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "TORCH_HOME": str(tmp_path / "torch"),
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "RT_PROGRESS_INTERVAL": "0",
    }
    env.pop("HF_HUB_OFFLINE", None)
    r = subprocess.run(
        [sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert re.search(r"validation \d\.\d{3}, test \d\.\d{3}", r.stdout), r.stdout
    assert len([line for line in r.stdout.splitlines() if line.startswith("pets-test")]) == 3, r.stdout
    for made in ["pets.h5", "pets-test.h5", "cat-head/meta.json", "cat-l4/meta.json", "cat-l4/model.onnx"]:
        assert (tmp_path / made).exists(), made
    assert (tmp_path / "audit" / "audit.json").exists()


def test_api_names_take_the_configs_the_cli_builds() -> None:
    """Every workflow function takes exactly one argument, its config, whose type is a public name too."""
    import inspect
    import typing

    import resnet_transfer as rt

    pairs = {
        "extract": "ExtractConfig",
        "fit_head": "FitHeadConfig",
        "finetune": "FinetuneConfig",
        "predict": "PredictConfig",
        "evaluate": "EvaluateConfig",
        "export": "ExportConfig",
        "audit": "AuditConfig",
        "suggest": "SuggestConfig",
        "curve": "CurveConfig",
    }
    for fn, cfg in pairs.items():
        params = list(inspect.signature(getattr(rt, fn)).parameters.values())
        hints = typing.get_type_hints(getattr(rt, fn))
        assert hints[params[0].name] is getattr(rt, cfg), fn
        assert all(p.default is not inspect.Parameter.empty for p in params[1:]), fn


@pytest.mark.parametrize("name", ["extract", "predict", "audit", "curve"])
def test_a_name_stays_the_function_after_its_module_is_imported(name: str) -> None:
    import importlib
    import pkgutil

    import resnet_transfer as rt

    before = getattr(rt, name)
    for m in pkgutil.walk_packages(rt.__path__, "resnet_transfer."):
        if not m.name.startswith("resnet_transfer.cli"):
            importlib.import_module(m.name)
    assert getattr(rt, name) is before and callable(before)
