"""`rt export`: the whole classifier (backbone + head) as one TorchScript or ONNX file, for serving
without this package, plus a JSON sidecar that records the preprocessing and the class names.

The exported graph takes RGB pixels scaled to [0, 1] (``float32``, ``N x 3 x S x S``, any batch size) and
returns logits; the mean/std normalisation is inside the graph (one less thing to get wrong when serving).
Resizing and cropping stay outside: the sidecar says how (resize the short side to ``R`` with the recorded
interpolation, centre-crop ``S``). After writing, the file is loaded back and its outputs compared with
the eager model; the difference is recorded in the sidecar.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..base import RtError, UsageError, atomic_path, atomic_write_json, get_reporter
from .config import ExportConfig

FORMATS = {"torchscript": ".torchscript.pt", "onnx": ".onnx"}
SIDECAR_FORMAT = "resnet_transfer.export"
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    format: str
    max_abs_diff: float
    checked_with: str


def export(cfg: ExportConfig) -> ExportResult:
    """Write ``cfg.model_dir``'s classifier as ``cfg.format`` (``torchscript`` | ``onnx``) to ``cfg.out``
    (default: inside the model directory) with a ``<out>.json`` sidecar; reload it and compare with the eager
    model. ``timm``: a timm model folder instead (:func:`timm_export.export_timm`)."""
    import torch

    fmt, out = cfg.format, cfg.out
    if fmt == "timm":  # a timm model folder: models/timm_export.py
        from .timm_export import export_timm

        folder, diff, checked_with = export_timm(cfg)
        return ExportResult(folder, folder / "config.json", fmt, diff, checked_with)
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not known", f"use one of: {', '.join(FORMATS)}, timm")
    from .loading import load_classifier

    model, md = load_classifier(cfg.model_dir, normalize=True)
    from .unknown import scored_classifier  # the out-of-distribution score as a second output (unknown.py)

    model, ood = scored_classifier(model, md, fmt)
    outputs = [OUTPUT_NAME, "ood_score"] if ood["in_graph"] else [OUTPUT_NAME]
    size = md.identity.transform.input_size
    path = Path(out) if out is not None else md.path / ("model" + FORMATS[fmt])
    if path.exists() and path.is_dir():
        raise UsageError(f"--out {path} is a directory", f"give a file name, e.g. {path / ('model' + FORMATS[fmt])}")
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice; the exporters' chatter
        if fmt == "torchscript":
            traced = torch.jit.trace(model, example)
            torch.jit.save(traced, str(tmp))
        else:
            _export_onnx(model, example, tmp, outputs)
    diff, checked_with = _check(model, path, fmt, size)
    sidecar = path.with_name(path.name + ".json")
    t = md.identity.transform
    info = {
        "format": SIDECAR_FORMAT,
        "format_version": 1,
        "model_format": fmt,
        "file": path.name,
        "classes": md.classes,
        "input": {
            "name": INPUT_NAME,
            "shape": ["N", 3, size, size],
            "dtype": "float32",
            "layout": "NCHW, RGB",
            "range": [0.0, 1.0],
        },
        "preprocessing": {
            "steps": [
                f"decode to RGB (EXIF orientation applied), resize the short side to {t.resize_size} px ({t.interpolation})",
                f"centre-crop {size} x {size}",
                "scale to [0, 1] (divide uint8 by 255), CHW",
            ],
            "resize_size": t.resize_size,
            "interpolation": t.interpolation,
            "input_size": size,
            "normalize": {"mean": list(t.mean), "std": list(t.std), "applied": "inside the exported model"},
        },
        "output": {"name": OUTPUT_NAME, "shape": ["N", len(md.classes)], "meaning": "logits; softmax -> probabilities"},
        "ood": ood,  # in_graph: a second output `ood_score` (N,); else why not (models/unknown.py)
        "identity": md.identity.to_dict(),
        "source": str(md.path),
        "check": {"max_abs_diff_vs_eager": diff, "runtime": checked_with},
    }
    atomic_write_json(sidecar, info)
    get_reporter().info(
        f"wrote {path} ({fmt}) and {sidecar.name}; reloaded with {checked_with}: max |logit diff| {diff:.2e}"
    )
    return ExportResult(path, sidecar, fmt, diff, checked_with)


def _export_onnx(model: Any, example: Any, path: Path, outputs: list[str] | None = None) -> None:
    import torch

    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as exc:
        raise RtError(
            "--format onnx needs the onnx and onnxscript packages", "pip install 'resnet_transfer[export]'"
        ) from exc
    batch = torch.export.Dim("batch", min=1, max=4096)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=outputs or [OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            external_data=False,
        )


def _check(model: Any, path: Path, fmt: str, size: int) -> tuple[float, str]:
    """Reload the exported file and return the max |difference| to the eager model on a random batch of
    another size than the one traced (so a batch dimension frozen at export time would show)."""
    import torch

    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _arrays(model(x))
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.jit.load(str(path))
        with torch.no_grad():
            got = _arrays(loaded(x))
        runtime = "torch.jit.load"
    else:
        import onnx

        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        try:
            import onnxruntime as ort
        except ImportError:
            from onnx.reference import ReferenceEvaluator

            got = ReferenceEvaluator(str(path)).run(None, {INPUT_NAME: x.numpy()})
            runtime = "onnx.checker + onnx.reference (onnxruntime not installed)"
        else:
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = sess.run(None, {INPUT_NAME: x.numpy()})
            runtime = f"onnx.checker + onnxruntime {ort.__version__}"
    diffs = [float(abs(g - r).max()) / max(1.0, float(abs(r).max())) for g, r in zip(got, ref)]
    diff = float(abs(got[0] - ref[0]).max())
    tol = 1e-3 * max(1.0, float(abs(ref[0]).max()))
    if not diff <= tol or max(diffs) > 1e-3:
        raise RtError(
            f"{path}: the exported model's outputs differ from the original by {diff:.3g} (> {tol:.3g})",
            "report this with the model directory; try the other --format meanwhile",
        )
    return diff, runtime


def _arrays(out: Any) -> list[Any]:
    """A module's output(s) (logits, or logits and the out-of-distribution score) as numpy arrays."""
    return [t.numpy() for t in (out if isinstance(out, (tuple, list)) else (out,))]
