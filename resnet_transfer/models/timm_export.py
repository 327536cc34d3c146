"""`rt export --format timm`: the classifier as a plain timm model folder, in timm's own layout.

The folder holds ``config.json`` (``architecture``, ``num_classes``, ``label_names`` and a ``pretrained_cfg``
with mean, std, input size, crop_pct, crop_mode and interpolation) and ``model.safetensors`` (the whole
network's state dict in timm's key names), written by timm itself (``timm.models.save_for_hf``), so that
``timm.create_model("local-dir:DIR", pretrained=True)`` loads it and ``timm.data.resolve_data_config`` +
``create_transform`` give our preprocessing; ``huggingface_hub.upload_folder`` can publish it as it is
(then ``hf-hub:user/name``).

The head becomes timm's classifier (``fc`` for ResNets, wherever ``pretrained_cfg["classifier"]`` says):
a linear head maps onto it with its feature standardisation folded in (``W * s``, ``b - (W * s) m``). An MLP
head (``--hidden``) or one on several stages' features has no place in a plain timm network: that is a
clear error pointing at ``--format onnx``. The head's temperature does not change the top class; it is
recorded in ``config.json`` as ``rt_temperature`` for those who want calibrated probabilities.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from pathlib import Path
from typing import Any

from ..base import ModelDirError, RtError, UsageError, fsync_dir, get_reporter

TIMM_DIR = "timm"  # default folder inside the model directory


def timm_crop_pct(input_size: int, resize_size: int) -> float:
    """``crop_pct`` such that timm's eval transform (``floor(input_size / crop_pct)``) resizes the short side
    to exactly ``resize_size``."""
    pct = input_size / resize_size
    for _ in range(8):
        if math.floor(input_size / pct) == resize_size:
            return pct
        pct = math.nextafter(pct, 0.0 if math.floor(input_size / pct) < resize_size else 1.0)
    return pct


def folded_linear(head: Any, where: str) -> tuple[Any, Any]:
    """The head as one linear map ``(weight, bias)`` on raw features, or a :class:`UsageError` saying which
    heads can go to timm."""
    import torch

    if head.hidden:
        raise UsageError(
            f"{where}: an MLP head (hidden {head.hidden}) has no place in a plain timm network (its classifier "
            "is one linear layer)",
            "export it with --format onnx (or torchscript), or fit a linear head for timm (`rt fit-head --head "
            "linear`; `--head auto` keeps the MLP where it validates better)",
        )
    if head.features:
        raise UsageError(
            f"{where}: the head reads pooled features of {', '.join(head.features)}; timm's classifier reads only "
            "the final pooled features",
            "export it with --format onnx (or torchscript), or fit a head on the final features for timm",
        )
    lin = head.net
    with torch.no_grad():
        w = lin.weight.float() * head.scale.float()
        b = lin.bias.float() - w @ head.mean.float()
    return w.contiguous(), b.contiguous()


def timm_network(clf: Any, md: Any) -> Any:
    """The timm network of ``md``'s architecture with ``clf``'s backbone weights and its head as classifier."""
    import timm

    w, b = folded_linear(clf.head, str(md.path))
    net = timm.create_model(md.identity.arch, pretrained=False, num_classes=len(md.classes))
    name = net.pretrained_cfg.get("classifier", "fc")
    if isinstance(name, (list, tuple)):
        name = name[0]
    state = dict(clf.net.state_dict())
    state[f"{name}.weight"], state[f"{name}.bias"] = w, b
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelDirError(
            f"{md.path}: its weights do not fit timm's {md.identity.arch} ({str(exc)[:200]})",
            "export with --format onnx",
        ) from exc
    return net.eval()


def export_timm(cfg: Any) -> tuple[Path, float, str]:
    """Write ``cfg.model_dir``'s classifier as a timm model folder (``cfg.out``, default ``MODEL_DIR/timm``),
    reload it with ``timm.create_model("local-dir:...", pretrained=True)`` and compare logits. Returns the
    folder, the max |logit difference| and what checked it."""
    import timm

    from .loading import load_classifier

    clf, md = load_classifier(cfg.model_dir)
    out = Path(cfg.out) if cfg.out is not None else md.path / TIMM_DIR
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file", "give a folder for --format timm (it holds config.json)")
    net = timm_network(clf, md)
    t = md.identity.transform
    data_config = {
        "input_size": (3, t.input_size, t.input_size),
        "interpolation": t.interpolation,
        "mean": tuple(t.mean),
        "std": tuple(t.std),
        "crop_pct": timm_crop_pct(t.input_size, t.resize_size),
        "crop_mode": "center",
    }
    extra: dict[str, Any] = {"label_names": list(md.classes)}
    if clf.head.temperature != 1.0:
        extra["rt_temperature"] = clf.head.temperature
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        timm.models.save_for_hf(net, str(tmp), model_config=extra, safe_serialization=True, data_config=data_config)
        diff = _check(clf, tmp, t.input_size)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    get_reporter().info(
        f"wrote {out} (timm: config.json + model.safetensors); reloaded with "
        f'timm.create_model("local-dir:{out}", pretrained=True): max |logit diff| {diff:.2e}'
    )
    return out, diff, f"timm {timm.__version__} local-dir"


def _check(clf: Any, folder: Path, size: int) -> float:
    """Max |logit difference| between timm's reload of ``folder`` and the classifier, on a random batch."""
    import timm
    import torch

    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        ref, got = clf(x), loaded(x)
    diff = float((got - ref).abs().max())
    tol = 1e-3 * max(1.0, float(ref.abs().max()))
    if not diff <= tol:
        raise RtError(
            f"{folder}: timm's reload differs from the model by {diff:.3g} (> {tol:.3g})",
            "report this with the model directory; use --format onnx meanwhile",
        )
    return diff


def _replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` at ``out``: a previous export stays whole until the new one is in."""
    for f in tmp.iterdir():
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    with contextlib.suppress(OSError):
        shutil.rmtree(old)
    fsync_dir(out.parent)
