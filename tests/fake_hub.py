"""Local model hubs for tests, with checkpoints the test makes itself (random-init weights): a Hugging Face
hub cache laid out as `huggingface_hub` leaves it (``models--timm--<name>/blobs/<sha256>``, a snapshot
linking to it, ``refs/main``) and a torch hub folder (``checkpoints/<arch>-<sha256 prefix>.pth``). Nothing
is downloaded: the tests run offline, and `RT_CACHE_DIR` keeps the record of checked files in the test's
own folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def use_hubs(mp: pytest.MonkeyPatch, root: Path) -> tuple[Path, Path]:
    """Point the Hugging Face cache (``root/hf/hub``), the torch hub (``root/torch/hub``) and the record of
    checked weights (``root/rt``) at ``root``, for this process and its subprocesses."""
    import huggingface_hub.constants as hub_constants

    hf, th = root / "hf", root / "torch"
    mp.setenv("HF_HOME", str(hf))
    mp.setenv("HF_HUB_CACHE", str(hf / "hub"))
    mp.setattr(hub_constants, "HF_HUB_CACHE", str(hf / "hub"))
    mp.setenv("TORCH_HOME", str(th))
    mp.setenv("RT_CACHE_DIR", str(root / "rt"))
    return hf / "hub", th / "hub" / "checkpoints"


def timm_state(name: str) -> dict[str, torch.Tensor]:
    """A random-init state dict of timm's ``name`` with its 1000-way classifier (as the hub holds it)."""
    import timm

    torch.manual_seed(1)
    return timm.create_model(name, pretrained=False).state_dict()


def hf_snapshot(hub: Path, repo_id: str, state: dict[str, torch.Tensor]) -> Path:
    """``state`` saved as ``model.safetensors`` of ``repo_id`` in the Hugging Face cache ``hub``; returns the
    snapshot's path (a link to the blob named by its sha256, as the hub client makes it)."""
    from safetensors.torch import save_file

    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    tmp = repo / "blobs" / "incoming"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    blob = repo / "blobs" / sha256(tmp)
    tmp.rename(blob)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    (snap / "model.safetensors").symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snap / "model.safetensors"


def tv_checkpoint(checkpoints: Path, arch: str, mp: pytest.MonkeyPatch) -> Path:
    """A random-init torchvision ``arch`` checkpoint in the torch hub folder, named as torchvision names its
    files (``<arch>-<first 8 hex of its sha256>.pth``); torchvision's default weights for ``arch`` are
    pointed at that name (the real file's hash cannot be forged). Returns the file."""
    import torchvision.models as tvm

    from resnet_transfer.backbone import TV_DEFAULT_WEIGHTS

    torch.manual_seed(2)
    checkpoints.mkdir(parents=True, exist_ok=True)
    tmp = checkpoints / "incoming.pth"
    torch.save(tvm.get_model(arch, weights=None).state_dict(), tmp)
    path = checkpoints / f"{arch}-{sha256(tmp)[:8]}.pth"
    tmp.rename(path)
    enum = tvm.get_model_weights(arch)[TV_DEFAULT_WEIGHTS[arch]]
    mp.setattr(enum.value, "url", f"https://download.pytorch.org/models/{path.name}")
    return path
