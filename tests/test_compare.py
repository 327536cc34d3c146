"""`rt compare`: the report's schema, reuse of the candidates' caches (a rerun computes nothing, a new
candidate only itself, an interrupted run resumes), the failing candidate's row, the errors before any
forward pass, the recommendation's rule, LogME against a direct implementation of the paper's algorithm,
and the command through CliRunner. Backbones: ``none`` and checkpoints saved here, at 32 px."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder
from typer.testing import CliRunner

import resnet_transfer as rt
from resnet_transfer.base import DataError, Interrupted, UsageError
from resnet_transfer.cli import app
from resnet_transfer.tools import CompareConfig, compare, logme, parse_candidate

KS = (2, 4)


def _checkpoint(path: Path, seed: int) -> Path:
    import timm
    import torch

    torch.manual_seed(seed)
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), path)
    return path


def _cfg(data: Path, test: Path, out: Path, models: list[str]) -> CompareConfig:
    return CompareConfig(data=data, test=test, models=models, out=out, ks=KS, seeds=3, image_size=32, compile="off")


@pytest.fixture(scope="module")
def runs(image_folder: Path, test_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three runs into one --out: the first, the same again, then with one new candidate (and a damaged file)."""
    tmp = tmp_path_factory.mktemp("compare")
    a, b = _checkpoint(tmp / "a.pth", 1), _checkpoint(tmp / "b.pth", 2)
    (tmp / "bad.pth").write_bytes(b"not a checkpoint")
    first = ["resnet18=none", f"resnet18={a}", f"resnet18={tmp / 'missing.pth'}"]
    out = tmp / "out"
    r1 = compare(_cfg(image_folder, test_folder, out, first)).report
    saved = json.loads((out / "compare.json").read_text())
    r2 = compare(_cfg(image_folder, test_folder, out, first[:2])).report
    r3 = compare(_cfg(image_folder, test_folder, out, [*first[:2], f"resnet18={b}", f"resnet18={tmp / 'bad.pth'}"]))
    return {"r1": r1, "saved": saved, "r2": r2, "r3": r3.report, "out": out, "tmp": tmp, "files": r3.files}


def test_schema(runs: dict, image_folder: Path, test_folder: Path) -> None:
    rep = runs["saved"]
    assert {"candidates", "recommended", "reason"} <= set(rep)
    assert rep["recommended"] in {c["spec"] for c in rep["candidates"]}
    n_images = 3 * 8 + 3 * 6
    for c in rep["candidates"][:2]:
        assert {
            "spec",
            "model",
            "weights",
            "accuracy",
            "interval",
            "curve",
            "logme",
            "images_per_second",
            "computed",
        } <= set(c)
        lo, hi = c["interval"]
        assert lo <= c["accuracy"] <= hi and 0 <= c["accuracy"] <= 1
        assert [p["k"] for p in c["curve"]] == list(KS) and len(c["curve"][-1]["scores"]) == 3
        assert c["accuracy"] == pytest.approx(np.mean(c["curve"][-1]["scores"]))
        assert c["computed"] == n_images and c["images_per_second"] > 0
        assert c["feature_size"] == 512 and c["parameters"] > 1e7 and c["cache_bytes"] > 0
        assert np.isfinite(c["logme"]) and isinstance(c["recorded_rates"], dict)
    assert rep["candidates"][1]["weights"].endswith("a.pth")
    assert rep["n_train"] == 24 and rep["n_test"] == 18 and rep["split"]["kind"] == "test folder"
    assert rep["candidates"][0]["spec"] in rep["reason"] or rep["candidates"][1]["spec"] in rep["reason"]
    assert "x its speed" in rep["reason"] or "most accurate" in rep["reason"]
    md = (runs["out"] / "compare.md").read_text()
    assert "| candidate |" in md and rep["recommended"] in md
    assert (runs["out"] / "compare.png").stat().st_size > 5000


def test_rerun_computes_nothing_and_gives_the_same_scores(runs: dict) -> None:
    first, again = runs["r1"]["candidates"][:2], runs["r2"]["candidates"]
    assert [c["computed"] for c in again] == [0, 0]
    assert [c["accuracy"] for c in again] == [c["accuracy"] for c in first]
    assert [c["curve"] for c in again] == [c["curve"] for c in first]
    assert all(c["images_per_second"] == f["images_per_second"] for c, f in zip(again, first))
    assert all("recorded" in c["rate_source"] for c in again)


def test_a_new_candidate_computes_only_itself(runs: dict) -> None:
    rows = runs["r3"]["candidates"]
    assert [c["computed"] for c in rows] == [0, 0, 42, 0]
    assert "measured in this run" in rows[2]["rate_source"]
    assert rows[2]["accuracy"] is not None and rows[2]["cache"] != rows[1]["cache"]


def test_a_candidate_without_weights_gets_its_row_with_the_error_and_the_fix(runs: dict) -> None:
    missing = runs["saved"]["candidates"][2]
    assert "no such file" in missing["error"] and missing["hint"] and missing["accuracy"] is None
    bad = runs["r3"]["candidates"][3]
    assert "cannot be read" in bad["error"] and "torch.save" in bad["hint"]
    assert runs["saved"]["recommended"] != missing["spec"]


def test_interrupted_run_resumes_with_the_finished_candidates(
    image_folder: Path, test_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import resnet_transfer.cache.extraction as extraction

    real = extraction.extract
    calls: list[str] = []

    def stop_at_resnet34(cfg):  # Ctrl-C while the second candidate extracts
        calls.append(cfg.model)
        if cfg.model == "resnet34":
            raise Interrupted("interrupted", "run the same command again")
        return real(cfg)

    monkeypatch.setattr(extraction, "extract", stop_at_resnet34)
    models = ["resnet18=none", "resnet34=none"]
    with pytest.raises(Interrupted):
        compare(_cfg(image_folder, test_folder, tmp_path, models))
    monkeypatch.setattr(extraction, "extract", real)
    rows = compare(_cfg(image_folder, test_folder, tmp_path, models)).report["candidates"]
    assert [c["computed"] for c in rows] == [0, 42]


def test_bad_data_is_an_error_before_any_forward_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import resnet_transfer.cache.extraction as extraction

    def never(cfg):
        raise AssertionError("a forward pass ran")

    monkeypatch.setattr(extraction, "extract", never)
    one = make_image_folder(tmp_path / "one", per_class=4, classes=("circle",))
    with pytest.raises(DataError, match="1 class"):
        compare(CompareConfig(data=one, models=["resnet18=none"], out=tmp_path / "o1"))
    lonely = make_image_folder(tmp_path / "lonely", per_class=3, classes=("circle", "square"))
    for p in list((lonely / "square").iterdir())[1:]:
        p.unlink()
    with pytest.raises(DataError, match="fewer than 2 images: 'square' \\(1\\)"):
        compare(CompareConfig(data=lonely, models=["resnet18=none"], out=tmp_path / "o2"))
    with pytest.raises(UsageError, match="resnt18") as err:
        compare(CompareConfig(data=lonely, models=["resnt18=none"], out=tmp_path / "o3"))
    assert "resnet18" in (err.value.hint or "") and "tv:resnet18" in (err.value.hint or "")


def test_candidate_specs() -> None:
    assert parse_candidate("resnet50") == rt.tools.Candidate("resnet50", "resnet50", "imagenet")
    assert parse_candidate(" resnet18=none ").weights == "none"
    assert parse_candidate("tv:resnet18=runs/source").model == "tv:resnet18"
    with pytest.raises(UsageError):
        parse_candidate("=none")


# -------------------------------------------------------------------------------------- recommendation


def _row(spec: str, scores: list[float], rate: float) -> dict:
    from resnet_transfer.tools import t_interval

    mean, lo, hi = t_interval(scores)
    return {
        "candidate": parse_candidate(spec),
        "accuracy": mean,
        "interval": [lo, hi],
        "images_per_second": rate,
        "curve": [{"k": 5, "scores": scores}],
    }


def test_recommendation_is_the_fastest_within_the_best_interval() -> None:
    from resnet_transfer.tools.comparison import recommend

    big = _row("resnet50", [0.90, 0.93, 0.92, 0.91], 30.0)
    small = _row("resnet18", [0.89, 0.93, 0.90, 0.91], 93.0)
    poor = _row("resnet18=none", [0.40, 0.45, 0.42, 0.41], 95.0)
    rec = recommend([big, small, poor])
    assert rec["recommended"] == "resnet18"
    assert rec["reason"].startswith("resnet18: within the interval of resnet50 (0.908 +- ")
    assert "at 3.1x its speed" in rec["reason"] and rec["paired"]["tied"]
    far = _row("resnet18", [0.80, 0.81, 0.80, 0.81], 93.0)  # outside the interval: the best stays
    rec = recommend([big, far, poor])
    assert rec["recommended"] == "resnet50" and "outside its interval" in rec["reason"]
    assert not rec["paired"]["tied"]


# ------------------------------------------------------------------------------------------------ LogME


def reference_logme(F: np.ndarray, y: np.ndarray) -> float:
    """The paper's Algorithm 1 written directly: full matrices, A = alpha I + beta F^T F inverted each step."""
    n, d = F.shape
    FtF = F.T @ F
    sigma = np.clip(np.linalg.eigvalsh(FtF), 0, None)
    out = []
    for c in np.unique(y):
        t = (y == c).astype(np.float64)
        alpha, beta = 1.0, 1.0
        for _ in range(1000):
            m = beta * np.linalg.solve(alpha * np.eye(d) + beta * FtF, F.T @ t)
            gamma = float(np.sum(beta * sigma / (alpha + beta * sigma)))
            alpha, beta = gamma / (m @ m), (n - gamma) / np.sum((F @ m - t) ** 2)
        A = alpha * np.eye(d) + beta * FtF
        m = beta * np.linalg.solve(A, F.T @ t)
        evidence = (
            n / 2 * np.log(beta)
            + d / 2 * np.log(alpha)
            - n / 2 * np.log(2 * np.pi)
            - beta / 2 * np.sum((F @ m - t) ** 2)
            - alpha / 2 * (m @ m)
            - np.linalg.slogdet(A)[1] / 2
        )
        out.append(evidence / n)
    return float(np.mean(out))


@pytest.mark.parametrize(("n", "d"), [(60, 8), (12, 30)])  # more rows than features, and fewer
def test_logme_matches_the_direct_algorithm(n: int, d: int) -> None:
    rng = np.random.default_rng(0)
    y = np.arange(n) % 3
    F = rng.normal(size=(n, d)) + 0.8 * np.eye(3, d)[y]
    assert logme(F, y) == pytest.approx(reference_logme(F, y), rel=1e-5)


def test_logme_scores_more_separable_features_higher() -> None:
    rng = np.random.default_rng(1)
    y = np.arange(300) % 4
    noise = rng.normal(size=(300, 16))
    scores = [logme(noise + s * np.eye(4, 16)[y], y) for s in (0.0, 0.5, 1.0, 3.0)]
    assert scores == sorted(scores) and scores[-1] - scores[0] > 0.1


# -------------------------------------------------------------------------------------------------- CLI


def test_cli(runs: dict, image_folder: Path, test_folder: Path) -> None:
    out = runs["out"]
    models = "resnet18=none," + f"resnet18={runs['tmp'] / 'a.pth'}"
    args = ["compare", "--data", str(image_folder), "--test", str(test_folder), "--models", models]
    args += ["--out", str(out), "--k", "2,4", "--seeds", "3", "--image-size", "32", "--compile", "off", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout[res.stdout.index("{") :])
    assert [c["computed"] for c in report["candidates"]] == [0, 0]  # the module's runs made the caches
    assert report["recommended"] in models.split(",")
    res = CliRunner().invoke(app, ["compare", "--data", str(image_folder), "--models", "resnet5O", "--out", str(out)])
    assert res.exit_code == 2 and "resnet50" in res.output
    assert "rt compare --data" in CliRunner().invoke(app, ["compare", "--help"]).output
