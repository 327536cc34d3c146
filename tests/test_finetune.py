"""rt finetune: the freeze policy, schedules, frozen parts staying bit-identical, resume, cached-stage
training, `--unfreeze auto`, class checks, and the finetuned directory as `--weights` for extract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES
from safetensors.torch import load_file

from resnet_transfer.backbone import build_backbone, save_backbone
from resnet_transfer.base import DataError, Reporter, RtError, UsageError, set_reporter
from resnet_transfer.finetuning import (
    AUTO_RULE_TEXT,
    FinetuneConfig,
    FreezePolicy,
    auto_unfreeze,
    finetune,
    load_checkpoint,
    lr_factor,
    resolve_bn,
)
from resnet_transfer.head import HeadModule, read_model_dir, write_model_dir
from resnet_transfer.images import stratified_split
from resnet_transfer.models import Classifier

SIZE = 32
FAST = {
    "image_size": None,
    "batch_size": 8,
    "precision": "fp32",
    "workers": 0,
    "start_margin": 0.0,
}  # mechanics: any gain


def _backbone():
    return build_backbone("resnet18", "none", SIZE)


def _head_dir(path: Path, classes=CLASSES, seed: int = 1) -> Path:
    """A head directory as `rt fit-head` writes it: a HeadModule with non-trivial weights and scaling."""
    bb = _backbone()
    torch.manual_seed(seed)
    head = HeadModule(bb.num_features, len(classes))
    head.mean.normal_()
    head.scale.uniform_(0.5, 2.0)
    return write_model_dir(
        path, "head", bb.identity, list(classes), head.config, {"head.safetensors": head.state_dict()}
    )


def _cfg(out: Path, **kw) -> FinetuneConfig:
    return FinetuneConfig(out=out, **{**FAST, **kw})


# -------------------------------------------------------------------------------------------- policy


def test_policy_progressive_epochs_lrs_and_modes():
    bb = _backbone()
    head = HeadModule(bb.num_features, 3)
    pol = FreezePolicy(bb.stage_groups(), head, "layer3", "progressive", epochs=9, lr=1e-3, lr_mult=0.5)
    starts = {p.name: p.start for p in pol.plans}
    assert starts == {"head": 0, "layer4": 3, "layer3": 6, "layer2": None, "layer1": None, "act1": None}
    lrs = {p.name: p.lr for p in pol.trained}
    assert lrs == pytest.approx({"head": 1e-3, "layer4": 5e-4, "layer3": 2.5e-4})
    assert pol.unfrozen_at(3) == ["layer4"] and pol.unfrozen_at(6) == ["layer3"] and pol.unfrozen_at(4) == []

    for epoch, trainable in ((0, {"head"}), (3, {"head", "layer4"}), (8, {"head", "layer4", "layer3"})):
        pol.apply(epoch)
        assert set(pol.trainable_at(epoch)) == trainable
        for name, p in bb.net.named_parameters():
            assert p.requires_grad == (name.split(".")[0] in trainable), (epoch, name)
        bb.net.train()  # what a careless loop would do; the policy puts frozen BN back to eval
        pol.train_mode(epoch)
        for name, m in bb.net.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                assert m.training == (name.split(".")[0] in trainable), (epoch, name)

    # the optimiser: only parts that ever train, no weight decay on 1-d tensors, zero lr until unfrozen
    groups = pol.param_groups(weight_decay=0.05)
    assert {g["name"] for g in groups} == {
        "head",
        "head.no_decay",
        "layer4",
        "layer4.no_decay",
        "layer3",
        "layer3.no_decay",
    }
    for g in groups:
        assert (g["weight_decay"] == 0.0) == g["name"].endswith(".no_decay")
        assert all((p.ndim <= 1) == g["name"].endswith(".no_decay") for p in g["params"])
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, pol.lr_lambdas(groups, 4, "cosine", 1.0))
    seen = []
    for _ in range(9 * 4):
        seen.append({g["name"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    l4 = [s["layer4"] for s in seen]
    assert all(v == 0 for v in l4[:12]) and l4[12] > 0  # unfrozen at epoch 3 = step 12
    assert max(l4) == pytest.approx(5e-4) and max(s["layer3"] for s in seen) == pytest.approx(2.5e-4)
    assert all(s["layer3"] == 0 for s in seen[:24]) and seen[24]["layer3"] > 0
    assert max(s["head"] for s in seen) == pytest.approx(1e-3)


def test_policy_rejects_unknown_stage_listing_valid_ones():
    bb = _backbone()
    with pytest.raises(UsageError) as e:
        FreezePolicy(bb.stage_groups(), HeadModule(512, 3), "layer5")
    assert "layer4" in e.value.hint and "all" in e.value.hint and "auto" in e.value.hint
    with pytest.raises(UsageError, match="needs 2 epoch"):
        FreezePolicy(bb.stage_groups(), HeadModule(512, 3), "layer3", "progressive", 9, unfreeze_at=[3])
    with pytest.raises(UsageError, match="non-decreasing"):
        FreezePolicy(bb.stage_groups(), HeadModule(512, 3), "layer3", "progressive", 9, unfreeze_at=[5, 2])


def test_lr_shapes():
    cos = [lr_factor(s, 0, 100, 10, "cosine") for s in range(100)]
    assert cos[0] < cos[5] < cos[9] <= 1.0 and max(cos) == pytest.approx(1.0) and cos[-1] < 0.01
    one = [lr_factor(s, 0, 100, 0, "onecycle") for s in range(100)]
    assert one[0] == pytest.approx(1 / 25) and max(one) == pytest.approx(1.0) and one.index(max(one)) == 30
    assert lr_factor(5, 10, 100, 5, "cosine") == 0.0


def test_auto_rule_documented_thresholds():
    stages = ["act1", "layer1", "layer2", "layer3", "layer4"]
    picks = {n: auto_unfreeze(n, stages, random_init=False)[0] for n in (5, 49, 50, 199, 200, 499, 500, 999, 1000)}
    assert picks == {
        5: "head", 49: "head", 50: "layer4", 199: "layer4", 200: "layer3",
        499: "layer3", 500: "layer2", 999: "layer2", 1000: "all",
    }  # fmt: skip
    assert auto_unfreeze(5, stages, random_init=True)[0] == "all"
    docs = (Path(__file__).parents[1] / "docs" / "finetune.md").read_text()
    assert "< 50" in AUTO_RULE_TEXT and "--unfreeze auto" in docs and "1000" in docs


def test_stratified_split_is_stratified_and_fixed():
    labels = [0] * 10 + [1] * 5 + [2] * 1 + [-1] * 3
    tr, va = stratified_split(labels, 0.2, seed=3)
    assert sorted(np.bincount(np.asarray(labels)[va], minlength=3).tolist()) == [0, 1, 2]
    assert set(tr) | set(va) == set(range(16)) and not set(tr) & set(va)
    _, va2 = stratified_split(labels, 0.2, seed=3)
    assert va.tolist() == va2.tolist()


# ------------------------------------------------------------------------------------ training runs


def test_frozen_stages_bit_identical_and_progressive_history(image_folder, tmp_path):
    """Start from a fitted head, progressive layer4 (epoch 1) -> layer3 (epoch 2): layers below stay
    bit-identical (parameters and BN running statistics), layer3/4 and the head move, the history shows
    the unfreezing at the right epochs with the right learning rates."""
    hd = _head_dir(tmp_path / "head")
    before = {k: v.clone() for k, v in _backbone().net.state_dict().items()}
    head_before = load_file(str(hd / "head.safetensors"))
    res = finetune(
        _cfg(
            tmp_path / "ft",
            head=hd,
            data=image_folder,
            unfreeze="layer3",
            schedule="progressive",
            unfreeze_at=[1, 2],
            epochs=3,
            lr=1e-3,
            lr_mult=0.5,
            val_fraction=0.0,
        )
    )  # fmt: skip  (no validation: the last epoch is kept, not an earlier best one)
    after = load_file(str(tmp_path / "ft" / "backbone.safetensors"))
    assert after.keys() == before.keys()
    for k, v in before.items():
        if k.startswith(("layer3", "layer4")):
            continue
        assert torch.equal(after[k], v), f"{k} changed although frozen"
    for stage in ("layer3", "layer4"):
        assert not torch.equal(after[f"{stage}.0.conv1.weight"], before[f"{stage}.0.conv1.weight"])
        # trained stages' BN statistics do update (train mode), so the frozen ones above are a real check
        assert not torch.equal(after[f"{stage}.0.bn1.running_mean"], before[f"{stage}.0.bn1.running_mean"])
    head_after = load_file(str(tmp_path / "ft" / "head.safetensors"))
    assert torch.equal(head_after["mean"], head_before["mean"])  # standardisation buffers kept
    assert not torch.equal(head_after["net.weight"], head_before["net.weight"])

    h = res.history
    assert [r["trainable"] for r in h] == [["head"], ["head", "layer4"], ["head", "layer4", "layer3"]]
    assert [r["unfrozen"] for r in h] == [[], ["layer4"], ["layer3"]]
    assert h[0]["lr"]["layer4"] == 0 and h[1]["lr"]["layer4"] > 0 and h[1]["lr"]["layer3"] == 0
    assert h[2]["lr"]["layer3"] > 0
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert report["start"]["head"].startswith("fitted head")
    assert [e["epoch"] for e in report["unfreeze_events"]] == [1, 2]
    assert {p["part"]: p["lr"] for p in report["plan"]}["layer3"] == pytest.approx(2.5e-4)
    png = tmp_path / "ft" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    md = read_model_dir(tmp_path / "ft")
    assert md.kind == "finetuned" and md.classes == list(CLASSES)
    assert set(md.meta["files"]) == {"head.safetensors", "backbone.safetensors", "ood.safetensors"}


def test_resume_equals_uninterrupted(image_folder, tmp_path):
    kw = {"data": image_folder, "model": "resnet18", "weights": "none", "image_size": SIZE, "unfreeze": "layer3",
          "schedule": "progressive", "unfreeze_at": [1, 2], "epochs": 3, "patience": 0, "color_jitter": 0.2}  # fmt: skip
    full = finetune(_cfg(tmp_path / "full", **kw))

    def stop_after_first(epoch, row):
        if epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(RtError, match="--resume"):
        finetune(_cfg(tmp_path / "cut", **kw), on_epoch_end=stop_after_first)
    ckpt = load_checkpoint(tmp_path / "cut")  # weights_only=True
    assert ckpt["epoch"] == 1 and {"model", "optimizer", "scheduler", "rng", "config"} <= set(ckpt)
    assert not (tmp_path / "cut" / "meta.json").exists()
    with pytest.raises(UsageError, match="--resume"):  # an unfinished run is not silently restarted
        finetune(_cfg(tmp_path / "cut", **kw))
    resumed = finetune(FinetuneConfig(out=tmp_path / "cut"), resume=tmp_path / "cut")

    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in full.history]
    assert [r["unfrozen"] for r in resumed.history] == [[], ["layer4"], ["layer3"]]
    for name in ("backbone.safetensors", "head.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "cut" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_checkpoint_every_changes_what_is_written_not_the_result(image_folder, tmp_path):
    kw = {"data": image_folder, "model": "resnet18", "weights": "none", "image_size": SIZE, "unfreeze": "layer4",
          "epochs": 3, "patience": 0}  # fmt: skip
    every = finetune(_cfg(tmp_path / "every", **kw))
    never = finetune(_cfg(tmp_path / "never", checkpoint_every=0, **kw))
    assert not (tmp_path / "never" / "checkpoints" / "last.pt").exists()
    assert (tmp_path / "every" / "checkpoints" / "last.pt").exists()
    assert [r["val_loss"] for r in never.history] == [r["val_loss"] for r in every.history]
    for name in ("backbone.safetensors", "head.safetensors"):  # the best epoch's weights, kept in memory
        a, b = load_file(str(tmp_path / "every" / name)), load_file(str(tmp_path / "never" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name

    def stop_after(n):
        def hook(epoch, row):
            if epoch + 1 == n:
                raise KeyboardInterrupt

        return hook

    with pytest.raises(RtError, match="no checkpoint was written"):
        finetune(_cfg(tmp_path / "first", checkpoint_every=2, **kw), on_epoch_end=stop_after(1))
    with pytest.raises(RtError, match="checkpoint saved"):
        finetune(_cfg(tmp_path / "two", checkpoint_every=2, **kw), on_epoch_end=stop_after(2))
    assert load_checkpoint(tmp_path / "two")["epoch"] == 2
    resumed = finetune(FinetuneConfig(out=tmp_path / "two"), resume=tmp_path / "two")
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in every.history]
    with pytest.raises(UsageError, match="--checkpoint-every"):
        finetune(_cfg(tmp_path / "bad", checkpoint_every=-1, **kw))
    with pytest.raises(UsageError, match="auto or a number"):
        finetune(_cfg(tmp_path / "bad", checkpoint_every="often", **kw))


def test_checkpoint_every_auto_skips_short_epochs_and_saves_on_interrupt(image_folder, tmp_path):
    """The default: a run whose epochs take seconds writes its resume checkpoint after the last epoch only,
    but an interrupt between epochs writes it first, and the resumed run equals an uninterrupted one."""
    kw = {"data": image_folder, "model": "resnet18", "weights": "none", "image_size": SIZE, "unfreeze": "layer4",
          "epochs": 3, "patience": 0}  # fmt: skip
    assert FinetuneConfig(out=tmp_path).checkpoint_every == "auto"
    seen = []

    def look(epoch, row):
        seen.append((tmp_path / "ref" / "checkpoints" / "last.pt").exists())

    ref = finetune(_cfg(tmp_path / "ref", **kw), on_epoch_end=look)
    assert seen == [False, False, True] and load_checkpoint(tmp_path / "ref")["epoch"] == 3

    def stop_after_two(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(RtError, match="checkpoint saved"):
        finetune(_cfg(tmp_path / "cut", **kw), on_epoch_end=stop_after_two)
    assert load_checkpoint(tmp_path / "cut")["epoch"] == 2
    resumed = finetune(FinetuneConfig(out=tmp_path / "cut"), resume=tmp_path / "cut")
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in ref.history]
    for name in ("backbone.safetensors", "head.safetensors"):
        a, b = load_file(str(tmp_path / "ref" / name)), load_file(str(tmp_path / "cut" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_bn_mode_auto_freezes_statistics_of_pretrained_backbones_only():
    assert resolve_bn("auto", random_init=False) == "frozen"
    assert resolve_bn("auto", random_init=True) == "train"
    assert resolve_bn("TRAIN", random_init=False) == "train"
    with pytest.raises(UsageError, match="--bn"):
        resolve_bn("sometimes", random_init=False)


def test_policy_with_frozen_bn_keeps_batchnorm_of_training_stages_in_eval():
    bb = _backbone()
    head = HeadModule(bb.num_features, 3)
    pol = FreezePolicy(bb.stage_groups(), head, "layer4", train_bn=False)
    pol.apply(0)
    pol.train_mode(0)
    layer4 = bb.net.get_submodule("layer4")
    bns = [m for m in layer4.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    convs = [m for m in layer4.modules() if isinstance(m, torch.nn.Conv2d)]
    assert bns and all(not m.training for m in bns)
    assert all(m.training for m in convs)
    assert all(p.requires_grad for m in bns for p in m.parameters())  # scale and shift still learn
    assert not bb.net.get_submodule("layer3").training


def test_policy_with_adapted_bn_tracks_statistics_in_frozen_stages_and_freezes_their_weights():
    bb = _backbone()
    head = HeadModule(bb.num_features, 3)
    pol = FreezePolicy(bb.stage_groups(), head, "layer4", train_bn=True, adapt_bn=True)
    pol.apply(0)
    pol.train_mode(0)
    layer3 = bb.net.get_submodule("layer3")
    bns = [m for m in layer3.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.training for m in bns)  # batch statistics, running statistics updated
    assert not any(m.training for m in layer3.modules() if isinstance(m, torch.nn.Conv2d))
    assert not any(p.requires_grad for p in layer3.parameters())  # the frozen stage's weights stay
    assert all(m.training for m in bb.net.get_submodule("layer4").modules())
    assert resolve_bn("adapt", random_init=False) == "adapt"


def test_finetune_bn_frozen_keeps_running_statistics(image_folder, tmp_path):
    kw = {"data": image_folder, "model": "resnet18", "weights": "none", "image_size": SIZE, "unfreeze": "layer4",
          "epochs": 1, "patience": 0, "checkpoint_every": 0}  # fmt: skip
    start = build_backbone("resnet18", "none", SIZE).net.state_dict()  # weights none: seeded, the same init
    key = next(k for k in start if k.startswith("layer4") and k.endswith("running_mean"))
    weight = key.replace("running_mean", "weight")
    got = {}
    for mode in ("frozen", "train"):
        finetune(_cfg(tmp_path / mode, bn=mode, **kw))
        assert json.loads((tmp_path / mode / "report.json").read_text())["bn"] == mode
        got[mode] = load_file(str(tmp_path / mode / "backbone.safetensors"))
    assert torch.equal(got["frozen"][key], start[key])
    assert not torch.equal(got["train"][key], start[key])
    assert not torch.equal(got["frozen"][weight], start[weight])  # BN's scale trained all the same


def test_finetune_refits_the_temperature_it_started_from(image_folder, tmp_path):
    bb = _backbone()
    torch.manual_seed(1)
    head = HeadModule(bb.num_features, len(CLASSES), temperature=5.0)  # a probe calibrated elsewhere
    hd = write_model_dir(
        tmp_path / "head", "head", bb.identity, list(CLASSES), head.config, {"head.safetensors": head.state_dict()}
    )
    kw = {"data": image_folder, "unfreeze": "layer4", "epochs": 1, "patience": 0, "checkpoint_every": 0}
    finetune(_cfg(tmp_path / "ft", head=hd, **kw))
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    cal = report["calibration"]
    assert cal["fitted"] and cal["previous"] == 5.0 and cal["n"] > 0
    assert report["temperature"] == cal["temperature"] != 5.0
    assert read_model_dir(tmp_path / "ft").head_config.get("temperature", 1.0) == report["temperature"]
    finetune(_cfg(tmp_path / "noval", head=hd, val_fraction=0.0, **kw))  # nothing to fit on: back to 1
    report = json.loads((tmp_path / "noval" / "report.json").read_text())
    assert report["temperature"] == 1.0 and report["calibration"]["fitted"] is False


def test_cached_stage_gradients_equal_full_model():
    """The trainable part gets the same gradients from the cut's maps as from the images."""
    bb = _backbone()
    frozen, rest = bb.split("layer3")
    head = HeadModule(bb.num_features, 3)
    pol = FreezePolicy(bb.stage_groups(), head, "layer4")
    pol.apply(0)
    model = Classifier(bb.net, head, rest)
    x = torch.randn(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    trainable = [(n, p) for n, p in [*bb.net.named_parameters(), *head.named_parameters()] if p.requires_grad]
    assert trainable and all(n.startswith(("layer4", "net.")) for n, _ in trainable)

    def grads(forward, inp):
        for _, p in trainable:
            p.grad = None
        pol.train_mode(0)
        torch.nn.functional.cross_entropy(forward(inp), y).backward()
        return [p.grad.clone() for _, p in trainable]

    full = grads(model.images, x)
    with torch.no_grad():
        pol.train_mode(0)
        maps = frozen(x)
    cached = grads(model.maps, maps)
    for (n, _), a, b in zip(trainable, full, cached):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), n
    assert all(p.grad is None for p in bb.net.parameters() if not p.requires_grad)


@pytest.fixture(scope="module")
def layer3_cache(image_folder, tmp_path_factory):
    from resnet_transfer.cache import ExtractConfig, extract

    out = tmp_path_factory.mktemp("l3") / "l3.h5"
    extract(ExtractConfig(data=image_folder, out=out, model="resnet18", weights="none", image_size=SIZE,
                          cut=["layer3"], precision="fp32", batch_size=8))  # fmt: skip
    return out


def test_cached_stage_training(layer3_cache, tmp_path):
    hd = _head_dir(tmp_path / "head")
    before = _backbone().net.state_dict()
    res = finetune(_cfg(tmp_path / "fast", head=hd, cache=layer3_cache, unfreeze="layer4", epochs=2, patience=0))
    after = load_file(str(tmp_path / "fast" / "backbone.safetensors"))
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.startswith("layer4"))
    assert not torch.equal(after["layer4.1.conv2.weight"], before["layer4.1.conv2.weight"])
    report = json.loads((tmp_path / "fast" / "report.json").read_text())
    assert report["cached_stage"] == "layer3" and res.history[-1]["trainable"] == ["head", "layer4"]
    assert report["n_train"] + report["n_val"] == 3 * 8

    for bad in ("layer3", "layer2", "all"):
        with pytest.raises(UsageError, match="holds maps at layer3") as e:
            finetune(_cfg(tmp_path / f"x-{bad}", head=hd, cache=layer3_cache, unfreeze=bad, epochs=1))
        assert "--unfreeze layer4" in e.value.hint


def test_class_mismatch_refused(image_folder, tmp_path):
    hd = _head_dir(tmp_path / "head", classes=("cat", "circle", "dog"))
    with pytest.raises(DataError, match="other classes than the head") as e:
        finetune(_cfg(tmp_path / "out", head=hd, data=image_folder, epochs=1))
    assert "square" in str(e.value) and "dog" in str(e.value)
    with pytest.raises(UsageError, match="--weights"):  # the backbone comes from the head dir
        finetune(_cfg(tmp_path / "out", head=_head_dir(tmp_path / "h2"), data=image_folder, weights="none"))


def test_auto_prints_rule_and_picks_head_for_few_images(image_folder, tmp_path):
    ckpt = tmp_path / "pre.safetensors"  # a "pretrained" file: auto only looks at data size
    bb = _backbone()
    save_backbone(bb.net, ckpt, bb.identity)
    rep = Reporter(verbose=False)
    previous = set_reporter(rep)
    try:
        res = finetune(_cfg(tmp_path / "auto", data=image_folder, model="resnet18", weights=str(ckpt),
                            image_size=SIZE, unfreeze="auto", epochs=1))  # fmt: skip
    finally:
        set_reporter(previous)
    assert res.unfreeze == "head"
    line = next(m for m in rep.messages if m.startswith("--unfreeze auto"))
    assert "-> head" in line and "8 labelled images per class" in line and AUTO_RULE_TEXT in line
    after = load_file(str(tmp_path / "auto" / "backbone.safetensors"))
    assert all(torch.equal(after[k], v) for k, v in bb.net.state_dict().items())


# ---------------------------------------------------------------------------- the output as --weights


@pytest.fixture(scope="module")
def scratch_model(image_folder, tmp_path_factory) -> Path:
    """`rt finetune --data ... --model resnet18 --weights none --unfreeze all`: a source model."""
    out = tmp_path_factory.mktemp("src") / "src"
    finetune(_cfg(out, data=image_folder, model="resnet18", weights="none", image_size=SIZE, unfreeze="all", epochs=1))
    return out


def test_finetuned_dir_is_weights_for_extract(scratch_model, image_folder, tmp_path):
    from resnet_transfer.cache import ExtractConfig, FeatureCache, extract
    from resnet_transfer.images import eval_transform, load_image

    md = read_model_dir(scratch_model)
    bb = build_backbone("resnet18", str(scratch_model))
    assert bb.identity.weights_id == md.identity.weights_id  # sha256 of backbone.safetensors
    assert bb.identity.transform == md.identity.transform and not bb.identity.differences(md.identity)
    assert not torch.equal(bb.net.state_dict()["conv1.weight"], _backbone().net.state_dict()["conv1.weight"])

    out = tmp_path / "new-task.h5"
    extract(ExtractConfig(data=image_folder, out=out, model="resnet18", weights=str(scratch_model),
                          precision="fp32", batch_size=8))  # fmt: skip
    with FeatureCache(out) as c:
        assert c.identity.weights_id == md.identity.weights_id and not c.identity.differences(md.identity)
        x = eval_transform(bb.transform)(load_image(image_folder / c.paths[0], draft=bb.transform.draft_target()))
        with torch.no_grad():
            ref = bb.net.eval()(x[None]).numpy()[0]
        assert np.allclose(c.features([0])[0], ref, rtol=2e-3, atol=2e-3)


def test_head_on_stage_features_is_refused(tmp_path):
    """A head fitted on other stages' pooled features (`features` in its config) cannot be finetuned yet."""
    bb = _backbone()
    head = HeadModule(256 + 512, len(CLASSES))
    config = {**head.config, "features": ["layer3", "layer4"]}
    hd = write_model_dir(
        tmp_path / "h", "head", bb.identity, list(CLASSES), config, {"head.safetensors": head.state_dict()}
    )
    with pytest.raises(UsageError, match="final pooled features") as e:
        finetune(_cfg(tmp_path / "out", head=hd, data=tmp_path, epochs=1))
    assert "layer3, layer4" in str(e.value) and "rt fit-head" in e.value.hint


# ------------------------------------------------------------------------------- unreadable images


def test_cli_unreadable_image_is_listed_counted_exit_3_and_strict_fails(tmp_path):
    """Like extract: an image that cannot be decoded is skipped, listed in report.json with its reason,
    counted at the end, and the exit code is 3; with --strict the run fails naming the file."""
    from conftest import make_image_folder
    from typer.testing import CliRunner

    from resnet_transfer.cli import app

    data = make_image_folder(tmp_path / "data", per_class=3, seed=5)
    (data / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    args = ["finetune", "--data", str(data), "--model", "resnet18", "--weights", "none", "--unfreeze", "layer4",
            "--epochs", "2", "--image-size", "32", "--batch-size", "4", "--precision", "fp32", "--workers", "0",
            "--val-fraction", "0.3", "--patience", "0"]  # fmt: skip
    runner = CliRunner()
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "ft")])
    assert res.exit_code == 3, res.output
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert [s["path"] for s in report["skipped"]] == ["circle/broken.png"]
    assert report["skipped"][0]["reason"]
    assert "1 image(s) could not be read" in res.output and "circle/broken.png" in res.output
    assert read_model_dir(tmp_path / "ft").kind == "finetuned"  # the run itself finished

    res = runner.invoke(app, [*args, "--out", str(tmp_path / "strict"), "--strict"])
    assert res.exit_code == 2 and "broken.png" in res.output and "drop --strict" in res.output
    assert not (tmp_path / "strict" / "meta.json").exists()


# ------------------------------------------------------------------------------------ recorded split


def test_finetune_keeps_the_heads_recorded_split(tmp_path):
    """The head directory's split.json (content keys) is kept: after images were added, moved, deleted and
    one made unreadable, no image the head trained on is in finetune's validation set, its validation images
    stay there, and only the new ones are split anew (stratified). The split used is written to the
    model directory in the same format."""
    import shutil

    from conftest import make_image_folder

    from resnet_transfer.base import file_digest

    data = make_image_folder(tmp_path / "data", per_class=6, seed=7)
    head_train, head_val = set(), set()
    for cls in CLASSES:
        files = sorted((data / cls).iterdir())
        head_train |= {file_digest(f) for f in files[:4]}
        head_val |= {file_digest(f) for f in files[4:]}
    hd = _head_dir(tmp_path / "head")
    split = {"seed": 0, "val_fraction": 0.33, "train": sorted(head_train), "val": sorted(head_val)}
    (hd / "split.json").write_text(json.dumps(split))

    # what happens to a dataset in between: additions, a move (same bytes, new name), a deletion, a corrupt file
    first = sorted((data / "circle").iterdir())[0]  # one the head trained on
    moved_key = file_digest(first)
    first.rename(data / "circle" / "renamed.png")
    deleted = sorted((data / "square").iterdir())[0]  # another one
    deleted_key = file_digest(deleted)
    deleted.unlink()
    new = make_image_folder(tmp_path / "new", per_class=4, seed=8)
    new_keys = set()
    for cls in CLASSES:
        for f in sorted((new / cls).iterdir()):
            new_keys.add(file_digest(f))
            shutil.copy(f, data / cls / f"added_{f.name}")
    broken = data / "triangle" / "broken.png"
    broken.write_bytes(b"not an image")
    new_keys.add(file_digest(broken))

    res = finetune(_cfg(tmp_path / "ft", head=hd, data=data, unfreeze="head", epochs=1, val_fraction=0.5))
    used = json.loads((tmp_path / "ft" / "split.json").read_text())
    train, val = set(used["train"]), set(used["val"])
    assert not train & val
    assert not val & head_train  # the head's training images never validate the finetuned model
    assert head_train - train == {deleted_key}  # all still present stay in train, the moved one too
    assert moved_key in head_train and moved_key in train
    assert head_val <= val  # its validation images are still held out
    assert train | val == (head_train - {deleted_key}) | head_val | new_keys
    assert len(val & new_keys) == 2 * len(CLASSES)  # about half of each class's new images (4, 4 and 5)
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert report["n_val"] == len(val) and report["n_train"] == len(train)
    assert [p for p, _ in res.skipped] == ["triangle/broken.png"]


# -------------------------------------------------------------------------------- precision auto


def test_precision_probe_picks_the_faster_and_leaves_the_run_alone(monkeypatch):
    """`--precision auto` on a CPU times fp32 and bf16 on a copy of the model and keeps the faster by its own
    medians; the run's parameters, requires_grad flags, train/eval modes and random streams are untouched.
    (No timing is asserted: only that the choice follows the recorded medians.)"""
    from resnet_transfer.backbone import precision_probe as precision_probe
    from resnet_transfer.base import runtime as runtime

    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: True)
    bb = _backbone()
    head = HeadModule(bb.num_features, 3)
    pol = FreezePolicy(bb.stage_groups(), head, "layer4", "progressive", epochs=4, unfreeze_at=[2])
    pol.apply(0)
    pol.train_mode(0)
    model = Classifier(bb.net, head)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    cpu = torch.device("cpu")

    prec, info = precision_probe.choose_train_precision("auto", cpu, model, pol, (3, SIZE, SIZE), 4, 10_000)
    assert info["mode"] == "probe" and set(info["median_ms"]) == {"fp32", "bf16"}
    assert prec == min(info["median_ms"], key=info["median_ms"].get)
    assert all(len(v) == precision_probe.ROUNDS for v in info["samples_ms"].values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)

    assert precision_probe.choose_train_precision("fp32", cpu, model, pol, (3, SIZE, SIZE), 4, 10_000) == (
        "fp32",
        {"mode": "given"},
    )
    short = precision_probe.choose_train_precision("auto", cpu, model, pol, (3, SIZE, SIZE), 4, 10)
    assert short[0] == "bf16" and short[1]["mode"] == "rule" and "too short" in short[1]["reason"]


def test_precision_auto_choice_is_recorded_and_kept_on_resume(image_folder, tmp_path, monkeypatch):
    from resnet_transfer.backbone import precision_probe as precision_probe

    monkeypatch.setattr(precision_probe, "MIN_STEPS_FOR_PROBE", 0)
    kw = {"data": image_folder, "model": "resnet18", "weights": "none", "image_size": SIZE, "unfreeze": "layer4",
          "epochs": 2, "patience": 0, "precision": "auto"}  # fmt: skip

    def stop(epoch, row):
        raise KeyboardInterrupt

    with pytest.raises(RtError, match="--resume"):
        finetune(_cfg(tmp_path / "ft", **kw), on_epoch_end=stop)
    state = json.loads(load_checkpoint(tmp_path / "ft")["state"])
    assert state["precision"] in ("fp32", "bf16") and state["precision_choice"]["mode"] in ("probe", "rule", "records")

    def no_probe(*args, **kwargs):
        raise AssertionError("a resumed run keeps its precision instead of probing again")

    monkeypatch.setattr(precision_probe, "probe_step_ms", no_probe)
    finetune(FinetuneConfig(out=tmp_path / "ft"), resume=tmp_path / "ft")
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert report["precision"] == state["precision"] and report["precision_choice"] == state["precision_choice"]


def test_start_is_a_candidate_and_kept_when_training_only_hurts(image_folder, tmp_path):
    """The fitted head on the untouched backbone is validated before any step; with an absurd learning rate
    no epoch can beat it, so the run hands back the start's weights bit for bit and report.json says so."""
    hd = _head_dir(tmp_path / "head")
    start_backbone = _backbone().net.state_dict()
    start_head = load_file(str(hd / "head.safetensors"))
    kw = {"data": image_folder, "unfreeze": "all", "epochs": 2, "patience": 0, "checkpoint_every": 0}
    res = finetune(_cfg(tmp_path / "ft", head=hd, lr=50.0, lr_mult=1.0, **kw))
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert report["kept_start"] is True and res.best_epoch == -1 == report["best_epoch"]
    assert report["start_validation"]["val_loss"] == pytest.approx(report["val_loss"])
    assert "the start" in report["selection"] and res.epochs_run == 2
    used = report["defaults_used"]
    assert (
        used["bn"] == "train" and used["label_smoothing"] == 0.1 and "lr" not in used
    )  # --lr was given; bn: random-init backbone
    assert all(not (r["val_loss"] < report["val_loss"]) for r in report["history"])  # nothing beat it
    after = load_file(str(tmp_path / "ft" / "backbone.safetensors"))
    for k, v in start_backbone.items():
        assert torch.equal(after[k], v), f"{k} differs from the start"
    head_after = load_file(str(tmp_path / "ft" / "head.safetensors"))
    assert all(torch.equal(head_after[k], v) for k, v in start_head.items())
    # a sane learning rate: an epoch beats the start, and the report names it
    finetune(_cfg(tmp_path / "ok", head=hd, lr=1e-3, **kw))
    ok = json.loads((tmp_path / "ok" / "report.json").read_text())
    assert ok["start_validation"] is not None
    assert ok["kept_start"] is (ok["best_epoch"] == -1)


def test_start_margin_keeps_the_start_unless_an_epoch_is_clearly_better(image_folder, tmp_path):
    """``--start-margin K``: an epoch replaces the start only when its per-image gain in the monitor is
    more than K standard errors; each row says what the paired comparison found. An absurd margin keeps
    the start whatever the epochs did; margin 0 is the plain rule (any gain)."""
    hd = _head_dir(tmp_path / "head")
    kw = {"data": image_folder, "unfreeze": "layer4", "epochs": 2, "patience": 0, "checkpoint_every": 0}
    kw |= {"head": hd, "monitor": "val_loss_cal", "lr": 1e-3, "start_margin": 0.0}
    plain = finetune(_cfg(tmp_path / "plain", **kw))
    rep = json.loads((tmp_path / "plain" / "report.json").read_text())
    rows = rep["history"]
    assert all(r["val_loss_cal"] <= r["val_loss"] + 1e-9 for r in rows)  # the fitted T never raises the NLL
    assert all(set(r["vs_start"]) == {"gain", "se", "clear", "held_back"} for r in rows)
    assert not any(r["vs_start"]["held_back"] for r in rows)  # margin 0: nothing better is held back
    gains = [r["vs_start"]["gain"] for r in rows]
    start_cal = rep["start_validation"]["val_loss_cal"]
    for r, g in zip(rows, gains, strict=True):
        assert g == pytest.approx(start_cal - r["val_loss_cal"], abs=1e-6)  # the mean of the paired gains
        assert r["vs_start"]["clear"] is (g > 0)
    expect = -1 if max(gains) <= 0 else int(np.argmax([-r["val_loss_cal"] for r in rows]))
    assert plain.best_epoch == expect
    strict_run = finetune(_cfg(tmp_path / "strict", **{**kw, "start_margin": 1e9}))
    strict = json.loads((tmp_path / "strict" / "report.json").read_text())
    assert strict_run.best_epoch == -1 and strict["kept_start"] is True
    assert strict["val_loss_cal"] == pytest.approx(start_cal)
    assert not any(r["vs_start"]["clear"] for r in strict["history"])
    # the start stays the best, so an epoch is held back exactly when its loss is below the start's
    assert [r["vs_start"]["held_back"] for r in strict["history"]] == [
        r["val_loss_cal"] < start_cal for r in strict["history"]
    ]
    # early stopping counts epochs that did not improve on the best value seen, held-back epochs included
    for patience in (1, 2):
        patient = finetune(_cfg(tmp_path / f"p{patience}", **{**kw, "start_margin": 1e9, "patience": patience,
                                                                 "epochs": 4}))  # fmt: skip
        seen, bad, expect = start_cal, 0, 4
        for i, r in enumerate(patient.history):
            bad = 0 if r["val_loss_cal"] < seen else bad + 1
            seen = min(seen, r["val_loss_cal"])
            if bad >= patience and i + 1 < 4:
                expect = i + 1
                break
        assert patient.epochs_run == expect and patient.stopped_early is (expect < 4)
        assert patient.best_epoch == -1
    with pytest.raises(UsageError, match="val_loss_cal"):
        finetune(_cfg(tmp_path / "bad", **{**kw, "monitor": "val_los"}))
    with pytest.raises(UsageError, match="--start-margin -1"):
        finetune(_cfg(tmp_path / "bad", **{**kw, "start_margin": -1.0}))


# ------------------------------------------------------------------ one command: the probe as the start


def test_one_command_starts_from_the_probe_it_fits(image_folder, tmp_path):
    """`rt finetune --data --weights PATH` (no head directory): extract + fit-head run in the process, under
    OUT/start, and the run starts from that head and keeps its split; --fresh-head and random weights don't."""
    ckpt = tmp_path / "pre.safetensors"
    bb = _backbone()
    save_backbone(bb.net, ckpt, bb.identity)
    common = dict(data=image_folder, model="resnet18", weights=str(ckpt), image_size=SIZE, unfreeze="head", epochs=1)
    res = finetune(_cfg(tmp_path / "one", **common))
    start = tmp_path / "one" / "start"
    assert (start / "features.h5").exists() and (start / "head" / "meta.json").exists()
    report = json.loads((tmp_path / "one" / "report.json").read_text())
    assert report["start"]["head"] == f"fitted head from {start / 'head'}"
    assert report["start"]["head_selection"]["chosen"] in ("linear", "mlp")
    assert report["start_validation"] is not None and res.unfreeze == "head"
    head_split = json.loads((start / "head" / "split.json").read_text())
    run_split = json.loads((tmp_path / "one" / "split.json").read_text())
    assert sorted(head_split["val"]) == sorted(run_split["val"]) and len(run_split["val"]) > 0
    # the same --out with another backbone (here another input size): --overwrite re-extracts the start
    again = finetune(_cfg(tmp_path / "one", overwrite=True, **{**common, "image_size": 48}))
    assert json.loads((again.out / "report.json").read_text())["start"]["backbone"]["transform"]["input_size"] == 48
    fresh = finetune(_cfg(tmp_path / "fresh", fresh_head=True, **common))
    scratch = finetune(_cfg(tmp_path / "scratch", **{**common, "weights": "none"}))
    for r in (fresh, scratch):
        assert not (r.out / "start").exists()
        assert json.loads((r.out / "report.json").read_text())["start"]["head"] == "fresh"
    # cached-stage training: the head is fitted on the stage cache's own pooled features
    from resnet_transfer.cache import ExtractConfig, extract

    staged = tmp_path / "l3.h5"
    extract(ExtractConfig(data=image_folder, out=staged, model="resnet18", weights=str(ckpt), image_size=SIZE,
                          cut=["layer3"], precision="fp32", batch_size=8))  # fmt: skip
    res = finetune(_cfg(tmp_path / "cached", cache=staged, unfreeze="layer4", epochs=1))
    report = json.loads((res.out / "report.json").read_text())
    assert report["cached_stage"] == "layer3" and (res.out / "start" / "head" / "meta.json").exists()
    assert not (res.out / "start" / "features.h5").exists()


# ------------------------------------------------------------------------------------------ --lr-find


def test_lr_suggestion_reads_the_curve():
    import math

    from resnet_transfer.finetuning.lr_find import suggest

    lrs = [1e-7 * 1e8 ** (k / 99) for k in range(100)]
    falling = [2.0 - 1.5 / (1 + math.exp(-3 * (math.log10(lr) + 3))) for lr in lrs]  # steepest near 1e-3
    lr, why = suggest(lrs, falling)
    assert 5e-4 < lr < 2e-3 and "steepest descent" in why
    flat = [0.5 if lr < 1e-3 else 0.5 + math.log10(lr) + 3 for lr in lrs]  # a fitted head: flat, then rising
    noisy = [v + (0.08 if k % 3 else -0.04) for k, v in enumerate(flat)]  # batch-to-batch noise on top
    for curve in (flat, noisy):
        lr, why = suggest(lrs, curve)
        assert 5e-5 < lr < 2e-4 and "then rising" in why
    assert suggest(lrs[:2], flat[:2])[0] == 1e-3


def test_lr_find_runs_before_training_and_leaves_the_start_alone(image_folder, tmp_path, monkeypatch):
    from resnet_transfer.finetuning import lr_find

    monkeypatch.setattr(lr_find, "STEPS", 12)
    hd = _head_dir(tmp_path / "head")
    common = dict(head=hd, data=image_folder, unfreeze="layer4", epochs=1, patience=0)
    plain = finetune(_cfg(tmp_path / "plain", **common))
    found = finetune(_cfg(tmp_path / "found", lr_find=True, **common))
    a, b = (json.loads((r.out / "report.json").read_text()) for r in (plain, found))
    assert a["start_validation"] == b["start_validation"]  # every weight and statistic put back
    assert a["lr_find"] is None and b["lr_find"]["steps"] >= 3 and (found.out / "lr_find.png").exists()
    assert b["config"]["lr"] == b["lr_find"]["suggestion"] and b["history"][0]["lr"]["head"] <= b["config"]["lr"]


@pytest.mark.parametrize("uint8", [False, True])
def test_prefetched_batches_are_the_same_with_decoded_images_kept(image_folder, tmp_path, uint8):
    """The feed's decode threads read kept images from memory in later epochs; the batches are bit for bit
    those of a feed that decodes every epoch, and the files are no longer needed once kept. With the
    feed's own transform (``uint8``) the kept images are arrays, converted once."""
    import shutil

    from resnet_transfer.finetuning.prefetch import decoded_ahead
    from resnet_transfer.images import (
        ImageDataset,
        TransformConfig,
        list_images,
        train_transform,
        train_transform_uint8,
    )

    data = shutil.copytree(image_folder, tmp_path / "data")
    tf = (train_transform_uint8 if uint8 else train_transform)(TransformConfig(SIZE, 36), 0.0, 0.35, True)
    kept, plain = (ImageDataset(list_images(data), tf, keep_decoded=k) for k in (64 << 20, 0))
    order = [[3, 1, 7, 0], [5, 2, 6, 4], [9, 8, 11, 10]]
    for ds in (kept, plain):
        torch.manual_seed(0)
        ds.epochs = [list(decoded_ahead(ds, order, 2)) for _ in range(2)]
    for a, b in zip(kept.epochs, plain.epochs):
        assert all(torch.equal(x, y) and i == j for (x, i, _), (y, j, _) in zip(a, b))
    shutil.rmtree(data)
    again = list(decoded_ahead(kept, order, 2))
    assert not any(e for _, _, errs in again for e in errs) and len(kept._decoded) == 12
    assert all(isinstance(im, np.ndarray) == uint8 for im in kept._decoded.values())
