"""`rt fit-head --head auto|linear|mlp`: fastai's MLP head on cached features, and the choice between it and
the linear probe on validation data (head/choose.py, the BatchNorm head in head/module.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from typer.testing import CliRunner

from resnet_transfer.base import UsageError
from resnet_transfer.cache import ExtractConfig, extract
from resnet_transfer.cli import app
from resnet_transfer.head import MLP_HEAD, FitHeadConfig, HeadModule, SoftmaxHead, build_head_module, choose_head
from resnet_transfer.head import fit_head as run_fit_head
from resnet_transfer.models import PredictConfig, predict

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("quiet_reporter")  # conftest.py


def xor(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes no linear head separates: the sign of x0 * x1 (plus 6 noise features)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 8)).astype(np.float32)
    return X, (X[:, 0] * X[:, 1] > 0).astype(np.int64)


def test_batchnorm_head_round_trips_and_trains_on_one_row() -> None:
    torch.manual_seed(0)
    m = HeadModule(16, 4, 32, 0.5, norm="batch")
    assert m.config["norm"] == "batch" and m.config["type"] == "mlp"
    m.train()
    m(torch.randn(8, 16)).sum().backward()  # batch statistics
    assert m(torch.randn(1, 16)).shape == (1, 4)  # one row: the running statistics, no error
    m.eval()
    x = torch.randn(5, 16)
    again = build_head_module(m.config)
    again.load_state_dict(m.state_dict())
    assert torch.allclose(again.eval()(x), m(x))
    with pytest.raises(ValueError, match="needs hidden"):
        HeadModule(16, 4, 0, norm="batch")


def test_onecycle_mlp_learns_what_the_linear_head_cannot() -> None:
    X, y = xor(600)
    Xt, yt = xor(400, seed=1)
    mlp = SoftmaxHead(**{**MLP_HEAD, "hidden": 64}).fit(X, y)
    lin = SoftmaxHead().fit(X, y)
    assert mlp.score(Xt, yt) > 0.85 > 0.65 > lin.score(Xt, yt)
    assert mlp.n_iter_ == 30 * (600 // 64)  # one-cycle: exactly epochs x full batches
    with pytest.raises(UsageError, match="needs --hidden"):
        SoftmaxHead(norm="batch").fit(X, y)


@pytest.mark.parametrize("n_val", [20, 150])  # below CV_BELOW: cross-validation; above: the split
def test_choose_head_keeps_the_head_that_validates_better(n_val: int) -> None:
    X, y = xor(300)
    Xv, yv = xor(n_val, seed=2)
    choice = choose_head(X, y, Xv, yv, {"num_classes": 2, "seed": 0})
    assert choice.chosen == "mlp" and choice.params["norm"] == "batch"
    assert choice.method == ("cv" if n_val < 100 else "split")
    by_head = {t["head"]: t["accuracy"] for t in choice.tried}
    assert by_head["mlp"] > by_head["linear"] + 0.2
    # linearly separable classes: the probe is as good, and ties go to it
    rng = np.random.default_rng(3)
    y2 = np.arange(200) % 2
    X2 = (rng.normal(size=(200, 8)) + 6.0 * y2[:, None]).astype(np.float32)
    choice = choose_head(X2[:160], y2[:160], X2[160:], y2[160:], {"num_classes": 2, "seed": 0})
    assert {t["accuracy"] for t in choice.tried} == {1.0}
    assert choice.chosen in ("linear", "mlp") and choice.tried[0]["head"] == "linear"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = make_image_folder(tmp_path_factory.mktemp("d"), per_class=12, seed=0)
    out = tmp_path_factory.mktemp("c") / "train.h5"
    extract(ExtractConfig(data=data, out=out, model="resnet18", weights="none", image_size=32))
    return out


def test_fit_head_reports_the_choice_and_the_head_it_wrote(cache: Path, tmp_path: Path, image_folder: Path) -> None:
    res = run_fit_head(FitHeadConfig(cache=cache, out=tmp_path / "auto"))
    sel = res.report["head_selection"]
    assert sel["method"] == "cv" and {t["head"] for t in sel["tried"]} == {"linear", "mlp"}
    assert res.report["head"]["type"] == sel["chosen"]
    meta = json.loads((tmp_path / "auto" / "meta.json").read_text())
    assert meta["head"]["type"] == ("mlp" if sel["chosen"] == "mlp" else "linear")
    # --head mlp: fastai's head, which predict reads back
    res = run_fit_head(FitHeadConfig(cache=cache, out=tmp_path / "mlp", head_type="mlp"))
    assert res.report["head"]["norm"] == "batch" and res.report["head_selection"]["method"] == "given"
    rows = predict(PredictConfig(model_dir=tmp_path / "mlp", inputs=[image_folder / "circle"])).rows
    assert len(rows) == 8 and all(abs(sum(p for _, p in r["top"]) - 1) < 1e-4 for r in rows)
    # an explicit head parameter is what the user asked for: no choice
    res = run_fit_head(FitHeadConfig(cache=cache, out=tmp_path / "l2", l2=0.1))
    assert res.report["head_selection"]["method"] == "none" and res.report["head"]["type"] == "linear"
    res = run_fit_head(FitHeadConfig(cache=cache, out=tmp_path / "h", hidden=16, solver="adamw", epochs=3))
    assert res.report["head"]["hidden"] == 16 and "norm" not in res.report["head"]  # the plain MLP asked for


def test_cli_head_option_and_its_errors(cache: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["fit-head", "--cache", str(cache), "--head", "mlp", "--epochs", "5", "--out", str(tmp_path / "m"), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout[r.stdout.index("{") :])
    assert rep["head"]["hidden"] == 512 and len(rep["history"]) == 5
    r = runner.invoke(app, ["fit-head", "--cache", str(cache), "--head", "deep", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--head 'deep'" in r.output and "auto, linear, mlp" in r.output
    r = runner.invoke(app, ["fit-head", "--cache", str(cache), "--head", "linear", "--hidden", "8", "--out", str(tmp_path / "y")])  # fmt: skip
    assert r.exit_code == 2 and "no hidden layer" in r.output
    r = runner.invoke(app, ["fit-head", "--help"])
    assert "--head" in r.output and "fastai" in r.output


def test_onecycle_adamw_matches_torch_optim() -> None:
    """The hand-written optimizer (no torch._dynamo import) is torch's AdamW + OneCycleLR, step for step."""
    from torch import nn

    from resnet_transfer.head.minibatch import OneCycleAdamW

    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    b = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    b.load_state_dict(a.state_dict())
    before = [p.detach().clone() for p in a.parameters()]
    steps = 37
    mine = OneCycleAdamW(a.parameters(), 2e-3, steps, 0.01)
    ref = torch.optim.AdamW(b.parameters(), lr=2e-3, weight_decay=0.01, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=2e-3, total_steps=steps, pct_start=0.25)
    for _ in range(steps):
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        for m, opt in ((a, mine), (b, ref)):
            m.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        sched.step()
    assert max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters())) < 1e-6
    assert all(float((p - q).abs().max()) > 1e-4 for p, q in zip(a.parameters(), before))  # it did train
