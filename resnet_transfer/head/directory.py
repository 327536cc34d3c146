"""Head and model directories: what `rt fit-head` and `rt finetune` write and `rt predict` reads.

Layout::

    meta.json            format, kind (head | finetuned), backbone identity, classes, head config,
                         sha256 of every weights file (an edited or swapped file is refused)
    head.safetensors     the softmax head (linear or MLP) weights
    backbone.safetensors the finetuned backbone (kind = finetuned only; `--weights DIR` loads it)
    split.json           the train/validation split the run used, by image content key
                         (``{"seed", "val_fraction", "train": [keys], "val": [keys]}``, keys from
                         ``fsutil.file_digest``); `rt finetune` from the directory keeps it
    report.json, *.png   what the run measured (not needed to predict)

Weights are safetensors only, so loading a directory never runs code. ``models.load_classifier`` is the
one way to turn a directory into a runnable model (backbone + head): predict, evaluate, export and finetune's
starting point all call it. The format lives in the head wing because `rt fit-head` writes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backbone import BackboneIdentity, sha256_file
from ..base import ModelDirError, atomic_path, atomic_write_json

FORMAT = "resnet_transfer.model"
FORMAT_VERSION = 1
META = "meta.json"
HEAD_FILE = "head.safetensors"
SPLIT_JSON = "split.json"


@dataclass
class ModelDir:
    """A parsed, verified model directory."""

    path: Path
    kind: str
    identity: BackboneIdentity
    classes: list[str]
    head_config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_backbone(self) -> bool:
        return self.kind == "finetuned"

    def file(self, name: str) -> Path:
        return self.path / name

    def load_tensors(self, name: str) -> dict[str, Any]:
        from safetensors.torch import load_file

        return load_file(str(self.path / name))


def write_model_dir(
    out: str | Path,
    kind: str,
    identity: BackboneIdentity,
    classes: list[str],
    head_config: dict[str, Any],
    tensors: dict[str, dict[str, Any]],
    extra_meta: dict[str, Any] | None = None,
    extra_files: list[str] | None = None,
) -> Path:
    """Write weights files (``{filename: state_dict}``) and ``meta.json`` (last, atomically), so a
    directory with a valid meta.json always has the files it names. ``extra_files`` are files the caller
    already wrote into ``out`` (e.g. ``backbone.safetensors`` with its own metadata) to checksum as well."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for name, state in tensors.items():
        clean = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        with atomic_path(out / name) as tmp:
            save_file(clean, str(tmp))
        hashes[name] = sha256_file(out / name)
    for name in extra_files or []:
        if not (out / name).is_file():
            raise ModelDirError(f"{out / name}: missing (listed in extra_files)")
        hashes[name] = sha256_file(out / name)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "identity": identity.to_dict(),
        "classes": list(classes),
        "head": head_config,
        "files": hashes,
        **(extra_meta or {}),
    }
    atomic_write_json(out / META, meta)
    return out


def read_model_dir(path: str | Path, verify: bool = True) -> ModelDir:
    """Read and check a head/model directory; every problem is a :class:`ModelDirError` naming the file."""
    p = Path(path)
    if not p.is_dir():
        raise ModelDirError(
            f"{p}: not a head/model directory", "give the --out directory of `rt fit-head` or `rt finetune`"
        )
    meta_path = p / META
    if not meta_path.exists():
        raise ModelDirError(f"{meta_path}: missing", "this is not a directory written by `rt fit-head`/`rt finetune`")
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ModelDirError(f"{meta_path}: not a resnet_transfer model (format={meta.get('format')})")
        if int(meta.get("format_version", 0)) != FORMAT_VERSION:
            raise ModelDirError(
                f"{meta_path}: model format version {meta.get('format_version')}, this rt reads {FORMAT_VERSION}",
                "re-run `rt fit-head` / `rt finetune` with this version",
            )
        identity = BackboneIdentity.from_dict(meta["identity"])
        classes = [str(c) for c in meta["classes"]]
        head = dict(meta["head"])
        kind = str(meta["kind"])
    except ModelDirError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelDirError(
            f"{meta_path}: unreadable or edited ({type(exc).__name__}: {exc})",
            "restore it, or re-run the command that wrote the directory",
        ) from exc
    if verify:
        for name, digest in meta.get("files", {}).items():
            f = p / name
            if not f.exists():
                raise ModelDirError(f"{f}: missing", "restore it, or re-run the command that wrote the directory")
            if sha256_file(f) != digest:
                raise ModelDirError(
                    f"{f}: changed since it was written (checksum differs from {META})",
                    "restore the original file, or re-run the command that wrote the directory",
                )
    return ModelDir(p, kind, identity, classes, head, meta)


def head_features(head_config: dict[str, Any]) -> list[str] | None:
    """The stages whose pooled features (concatenated) are the head's input; ``None``: the final ones."""
    features = head_config.get("features")
    return [str(s) for s in features] if features else None


# ------------------------------------------------------------------------------------- the recorded split


def write_split(out: str | Path, seed: int, val_fraction: float, train: list[str], val: list[str]) -> Path:
    """Record a run's train/validation split by content key (``split.json``, atomically)."""
    path = Path(out) / SPLIT_JSON
    atomic_write_json(path, {"seed": int(seed), "val_fraction": float(val_fraction), "train": train, "val": val})
    return path


def read_split(model_dir: str | Path) -> dict[str, Any] | None:
    """A directory's recorded split (``None`` if it has none); a damaged file is a :class:`ModelDirError`."""
    path = Path(model_dir) / SPLIT_JSON
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
        record = {"train": [str(k) for k in d["train"]], "val": [str(k) for k in d["val"]]}
        record.update({k: d[k] for k in ("seed", "val_fraction") if k in d})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelDirError(
            f"{path}: unreadable or edited ({type(exc).__name__}: {exc})",
            "restore it, or delete it to split the data anew",
        ) from exc
    return record
