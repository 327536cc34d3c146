"""`--unfreeze auto` decided by validation (finetuning/depth_search.py): the deeper candidate, the better kept,
the loser whole, the rule alone where the search cannot afford to, and an interrupted search resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder
from safetensors.torch import load_file

from resnet_transfer.backbone import build_backbone, save_backbone
from resnet_transfer.base import RtError
from resnet_transfer.finetuning import FinetuneConfig, finetune
from resnet_transfer.finetuning import depth_search as ds
from resnet_transfer.models import load_classifier

SIZE = 32
PARTS = ["head", "layer4", "layer3", "layer2", "layer1", "act1"]


def test_deeper_part_walks_down_the_plan_and_respects_a_cut():
    assert ds.deeper_part("head", PARTS) == "layer4"
    assert ds.deeper_part("layer4", PARTS) == "layer3"
    assert ds.deeper_part("act1", PARTS) == "all"
    assert ds.deeper_part("all", PARTS) is None
    assert ds.deeper_part("layer4", PARTS, allowed=["head", "layer4"]) is None  # maps cut at layer3


@pytest.fixture(scope="module", autouse=True)
def small_validation_searches():
    """The fixture's 21 validation images search here (the default asks for 50: a smaller folder, faster)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ds, "MIN_VAL_ROWS", 20)
        yield


@pytest.fixture(scope="module")
def search_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """24 images per class (the rule: head only) and a "pretrained" file (the rule looks at data size only)."""
    root = tmp_path_factory.mktemp("search")
    data = make_image_folder(root / "data", per_class=24, seed=11)
    bb = build_backbone("resnet18", "none", SIZE)
    save_backbone(bb.net, root / "pre.safetensors", bb.identity)
    return data, root / "pre.safetensors"


def _cfg(out: Path, data: Path, weights: Path, **kw) -> FinetuneConfig:
    base = {"model": "resnet18", "weights": str(weights), "image_size": SIZE, "unfreeze": "auto", "epochs": 2,
            "batch_size": 8, "precision": "fp32", "workers": 0, "val_fraction": 0.3, "patience": 0}  # fmt: skip
    return FinetuneConfig(out=out, data=data, **{**base, **kw})


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def searched(search_data, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, list[str]]:
    """One uninterrupted `--unfreeze auto` run with its search: (out, result, the reporter's messages)."""
    from resnet_transfer.base import Reporter, set_reporter

    data, pre = search_data
    out = tmp_path_factory.mktemp("searched") / "ft"
    rep = Reporter(verbose=False)
    previous = set_reporter(rep)
    try:
        res = finetune(_cfg(out, data, pre))
    finally:
        set_reporter(previous)
    return out, res, rep.messages


def test_search_keeps_the_better_and_the_loser_whole(searched):
    out, res, messages = searched
    search = _report(out)["unfreeze_search"]
    cands = search["candidates"]
    assert set(cands) == {"head", "layer4"} and search["rule"] == "head"
    best = min(cands, key=lambda c: (cands[c]["val_loss"], c != "head"))  # a tie keeps the rule's pick
    assert search["chosen"] == best == res.unfreeze
    loser = next(c for c in cands if c != best)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["finetune"]["unfreeze"] == best and meta["identity"]["weights"] == str(out)
    lost = out / "trials" / loser
    assert json.loads((lost / "meta.json").read_text())["finetune"]["unfreeze"] == loser
    assert _report(lost)["val_loss"] == cands[loser]["val_loss"]
    for d in (out, lost):
        load_classifier(d)  # both whole model directories (their files' digests checked)
    assert any("decided by validation" in m for m in messages)


def test_a_better_deeper_candidate_replaces_the_rules_run(search_data, tmp_path, monkeypatch, quiet_reporter):
    data, pre = search_data
    monkeypatch.setattr(ds, "_better", lambda theirs, mine, monitor: True)  # whatever validation says
    res = finetune(_cfg(tmp_path / "ft", data, pre, epochs=1))
    out = tmp_path / "ft"
    assert res.unfreeze == "layer4" and res.out == out
    report = _report(out)
    assert report["unfreeze"] == "layer4" and report["unfreeze_search"]["chosen"] == "layer4"
    for name in ("backbone.safetensors", "head.safetensors"):  # the trial's files, byte for byte
        assert (out / name).read_bytes() == (out / "trials" / "layer4" / name).read_bytes()
    rule = out / "trials" / "head"  # the rule's run, moved aside whole
    assert _report(rule)["unfreeze"] == "head"
    assert json.loads((rule / "meta.json").read_text())["identity"]["weights"] == str(rule)
    start = build_backbone("resnet18", str(pre), SIZE).net.state_dict()
    kept = load_file(str(rule / "backbone.safetensors"))  # head only: the backbone did not move
    assert all(torch.equal(kept[k], v) for k, v in start.items() if k in kept)


def test_the_rule_alone_where_the_search_cannot_afford_to(search_data, image_folder, tmp_path, monkeypatch,
                                                          quiet_reporter):  # fmt: skip
    data, pre = search_data
    finetune(_cfg(tmp_path / "few", image_folder, pre, epochs=1, val_fraction=0.2))
    why = _report(tmp_path / "few")["unfreeze_search"]["why"]
    assert "too few to choose" in why and not (tmp_path / "few" / "trials").exists()
    monkeypatch.setattr(ds, "MIN_BUDGET_S", 0.0)
    monkeypatch.setattr(ds, "DEEPER_COST", 1e6)
    finetune(_cfg(tmp_path / "long", data, pre, epochs=1))
    why = _report(tmp_path / "long")["unfreeze_search"]["why"]
    assert "budget" in why and "--unfreeze layer4" in why
    stale = tmp_path / "given" / "trials" / "layer3"  # an earlier run's candidate: never read back as this one's
    stale.mkdir(parents=True)
    (stale / "report.json").write_text("{}")
    finetune(_cfg(tmp_path / "given", data, pre, epochs=1, unfreeze="layer4", overwrite=True))  # no search
    assert "unfreeze_search" not in _report(tmp_path / "given") and not stale.exists()


def test_an_interrupted_search_resumes_to_the_same_choice(search_data, searched, tmp_path, quiet_reporter):
    data, pre = search_data
    calls = []

    def stop_in_the_trial(epoch, row):  # the rule's run has 2 epochs; the 3rd call is the trial's first
        calls.append(epoch)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(RtError) as e:
        finetune(_cfg(tmp_path / "cut", data, pre), on_epoch_end=stop_in_the_trial)
    assert f"--resume {tmp_path / 'cut'}" in e.value.hint
    finetune(FinetuneConfig(out=tmp_path / "cut"), resume=tmp_path / "cut")
    a, b = _report(searched[0])["unfreeze_search"], _report(tmp_path / "cut")["unfreeze_search"]
    assert a["chosen"] == b["chosen"]
    for c in a["candidates"]:
        assert a["candidates"][c]["val_loss"] == pytest.approx(b["candidates"][c]["val_loss"], abs=1e-6)
