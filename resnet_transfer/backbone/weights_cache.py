"""Pretrained weights files in the hubs' local caches: checked against the hash their name carries, once,
and a damaged or mismatched file reported as such, by name, with the fix.

torchvision names a checkpoint after the first hex digits of its sha256 (``resnet18-f37072fd.pth``, torch.hub's
convention); the Hugging Face cache stores a large file as ``blobs/<sha256>``, the snapshot's file name
linking to it. :func:`check_weights_file` hashes such a file the first time it is used and remembers that
it passed by path, size, mtime_ns and inode (``checked-weights.json`` in ``RT_CACHE_DIR``, default
``~/.cache/resnet_transfer``): later runs only stat it, and a file cut short or replaced since has another
stat, so it is hashed again. Cost: docs/performance.md ("Checking cached weights").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from ..base import WeightsError

HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")  # torch.hub's HASH_REGEX: resnet18-f37072fd.pth
SHA256_NAME = re.compile(r"^[a-f0-9]{64}$")  # a Hugging Face cache blob of a large (LFS) file
RECORD = "checked-weights.json"
HF_WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.bin")  # what timm loads from a hub repo, in order


def record_file() -> Path:
    """Where files that passed their check are remembered."""
    base = os.environ.get("RT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "resnet_transfer"
    return Path(base).expanduser() / RECORD


def expected_hash(path: Path) -> str | None:
    """The sha256 (or its prefix) that ``path``'s name promises: a torch hub checkpoint's name, or the blob a
    Hugging Face snapshot file links to. None when the name promises none."""
    blob = path.resolve()
    if SHA256_NAME.match(blob.name):
        return blob.name
    m = HASH_IN_NAME.search(path.name)
    return m.group(1) if m else None


def _stat(path: Path) -> list[int]:
    st = path.resolve().stat()
    return [int(st.st_size), int(st.st_mtime_ns), int(st.st_ino)]


def _read_record() -> dict[str, Any]:
    try:
        data = json.loads(record_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def remember(path: Path) -> None:
    """Record ``path`` as checked at its current stat (best effort: a read-only home only costs a re-check)."""
    from ..base import atomic_write_json

    record = _read_record()
    record[str(path.resolve())] = _stat(path)
    try:
        record_file().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(record_file(), record, indent=None)
    except OSError:
        pass


def check_weights_file(path: Path, what: str, fix: str) -> str:
    """Check ``path`` against the hash its name promises, unless it passed before with the same stat.
    Returns ``"remembered"``, ``"checked"`` or ``"no hash in its name"``; raises :func:`damaged` when the
    bytes do not match (``what``: e.g. ``torchvision ResNet18_Weights.IMAGENET1K_V1``; ``fix``: how to get
    the file again)."""
    want = expected_hash(path)
    if want is None:
        return "no hash in its name"
    if _read_record().get(str(path.resolve())) == _stat(path):
        return "remembered"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    got = h.hexdigest()
    if not got.startswith(want):
        raise damaged(path, what, f"its sha256 starts {got[: len(want)][:12]}, its name says {want[:12]}", fix)
    remember(path)
    return "checked"


def damaged(path: Path, what: str, why: str, fix: str) -> WeightsError:
    """The error for a cached weights file that is damaged or is not the file its name says."""
    shown = str(path) if path.resolve() == path.absolute() else f"{path} (-> {path.resolve().name})"
    return WeightsError(
        f"{shown}: the cached {what} weights file is damaged or not the file its name says ({why})",
        f"{fix}, or pass --weights PATH (a local checkpoint) or --weights none",
    )


def load_torch_hub_file(path: Path, what: str) -> dict[str, Any]:
    """A torch hub checkpoint already in the cache: checked (:func:`check_weights_file`), then loaded with
    ``torch.load(weights_only=True)``; a file that does not load is reported as damaged."""
    import torch

    fix = f"delete {path} and run again where download.pytorch.org is reachable (it is downloaded afresh)"
    check_weights_file(path, what, fix)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise damaged(path, what, f"cannot be read: {_first_line(exc)}", fix) from exc


def hf_cached_weights(timm_name: str) -> list[Path]:
    """The weights files of timm's ``timm_name`` already in the Hugging Face cache (usually one)."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(timm_name)
    except Exception:  # an unknown name: timm says so when the model is built
        return []
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return []
    repo, _, revision = hub_id.partition("@")
    found = [try_to_load_from_cache(repo, name, revision=revision or None) for name in HF_WEIGHTS_NAMES]
    return [Path(p) for p in found if isinstance(p, str) and Path(p).exists()]


def hf_fix(path: Path) -> str:
    """How to get a Hugging Face cache file again: delete the model's folder in the cache."""
    repo = next((p for p in path.parents if p.name.startswith("models--")), path.parent)
    return f"delete the folder {repo} and run again where huggingface.co is reachable (it is downloaded afresh)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"
