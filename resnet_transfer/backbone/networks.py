"""Backbones: model names -> a headless network, its weights, its stages and its eval transform.

One builder (:func:`build_backbone`) for every source. The network is always a timm model created with
``num_classes=0`` (its classifier removed, its forward returning pooled features). Torchvision weights
(``tv:resnet50``) are loaded into the timm ResNet, whose parameter names are the same as torchvision's; the
strict load proves the two architectures match. Stage names come from the model's own ``feature_info``.
"""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base import UsageError, WeightsError, atomic_path
from ..images import TransformConfig
from .identity import BackboneIdentity, sha256_file
from .weights_cache import check_weights_file, damaged, hf_cached_weights, hf_fix, load_torch_hub_file, remember

TV_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# torchvision's best ImageNet weights per ResNet (what `--model tv:resnetNN` loads with --weights imagenet)
TV_DEFAULT_WEIGHTS = {
    "resnet18": "IMAGENET1K_V1",
    "resnet34": "IMAGENET1K_V1",
    "resnet50": "IMAGENET1K_V2",
    "resnet101": "IMAGENET1K_V2",
    "resnet152": "IMAGENET1K_V2",
}
BACKBONE_FILE = "backbone.safetensors"
INIT_SEED = 0  # `--weights none` is a fixed random init, so extract and predict see the same function


@dataclass
class Backbone:
    """A headless network plus what is needed to use it: stages, transform and identity."""

    net: Any  # torch.nn.Module; forward(x) -> pooled features (N, num_features)
    identity: BackboneIdentity
    stages: list[str] = field(default_factory=list)

    @property
    def transform(self) -> TransformConfig:
        return self.identity.transform

    @property
    def num_features(self) -> int:
        return self.identity.num_features

    def check_stage(self, name: str, option: str = "--cut") -> str:
        if name not in self.stages:
            raise UsageError(
                f"{option} {name!r} is not a stage of {self.identity.model}",
                f"use one of: {', '.join(self.stages)}",
            )
        return name

    def stage_groups(self) -> list[tuple[str, list[Any]]]:
        """The trunk split into consecutive groups, one per stage (input to output), then ``head``.

        Group ``s`` holds every module after the previous stage's output up to and including stage ``s``;
        ``head`` holds what comes after the last stage (pooling, norms). Freezing "everything before
        stage s" means freezing the groups before ``s``."""
        seq = _flat_trunk(self.net)
        groups: list[tuple[str, list[Any]]] = []
        current: list[Any] = []
        stage_iter = iter(self.stages)
        target = next(stage_iter, None)
        for name, module in seq:
            current.append(module)
            if name == target:
                groups.append((target, current))
                current = []
                target = next(stage_iter, None)
        groups.append(("head", current))
        return groups

    def split(self, cut: str) -> tuple[Any, Any]:
        """Two modules, ``frozen`` (images -> the maps at ``cut``) and ``rest`` (maps -> pooled features),
        with ``rest(frozen(x)) == net(x)``. Verified on a small input: a model whose forward is not a
        plain sequence of its children is refused rather than silently wrong."""
        self.check_stage(cut)
        seq = _flat_trunk(self.net)
        names = [n for n, _ in seq]
        i = names.index(cut) + 1
        frozen = nn.Sequential(*[m for _, m in seq[:i]])
        rest = _Rest(nn.Sequential(*[m for _, m in seq[i:]]), self.net)
        x = torch.randn(2, 3, 64, 64)
        was_training = self.net.training
        self.net.eval()
        with torch.no_grad():
            ok = torch.allclose(rest(frozen(x)), self.net(x), rtol=1e-3, atol=1e-4)
        self.net.train(was_training)
        if not ok:
            raise UsageError(
                f"{self.identity.model} cannot be split at {cut!r}: its forward is not a sequence of stages",
                "use a ResNet (or another timm CNN with sequential stages), or omit --cut",
            )
        return frozen, rest


class _Rest(nn.Module):
    """The trunk after the cut, then the model's own pooling (``forward_head(pre_logits=True)``)."""

    def __init__(self, tail: nn.Module, net: nn.Module) -> None:
        super().__init__()
        self.tail = tail
        self._net = [net]  # not registered: pooling is reached through net.forward_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._net[0].forward_head(self.tail(x), pre_logits=True)


def _flat_trunk(net: Any) -> list[tuple[str, Any]]:
    """The modules ``forward_features`` runs, in order, with stage containers (``stages``) opened one
    level so that ``stages.2`` is an item. Everything after the features (pool, fc, head) is left out."""
    from torch import nn

    stage_names = {d["module"] for d in net.feature_info}
    skip = set()
    for attr in ("global_pool", "fc", "head", "classifier", "head_drop", "fc_norm"):
        if hasattr(net, attr):
            skip.add(attr)
    out: list[tuple[str, Any]] = []
    for name, child in net.named_children():
        if name in skip:
            continue
        inner = [f"{name}.{n}" for n, _ in child.named_children()]
        if isinstance(child, nn.Sequential) and name not in stage_names and stage_names & set(inner):
            out.extend((f"{name}.{n}", m) for n, m in child.named_children())
        else:
            out.append((name, child))
    return out


# ----------------------------------------------------------------------------------------------- names


@dataclass(frozen=True)
class ModelName:
    """A parsed ``--model``: ``source`` is ``timm`` or ``tv``; ``arch`` the timm architecture;
    ``timm_name`` the full timm name (with pretrained tag when given)."""

    source: str
    arch: str
    timm_name: str

    @property
    def display(self) -> str:
        return f"{self.source}:{self.timm_name}"


def parse_model_name(model: str) -> ModelName:
    """``resnet50`` / ``timm:resnet50.a1_in1k`` -> timm; ``tv:resnet50`` / ``torchvision:resnet50`` -> tv.
    Unknown names raise a :class:`UsageError` that suggests close names."""
    import timm

    raw = model.strip()
    source = "timm"
    if ":" in raw:
        prefix, raw = raw.split(":", 1)
        prefix = prefix.lower()
        if prefix in ("tv", "torchvision"):
            source = "tv"
        elif prefix != "timm":
            raise UsageError(f"--model {model!r}: unknown source {prefix!r}", "use tv:NAME or timm:NAME")
    if source == "tv":
        if raw not in TV_RESNETS:
            raise UsageError(
                f"--model {model!r}: torchvision backbones supported are {', '.join(TV_RESNETS)}",
                "use e.g. --model tv:resnet50, or a timm name such as resnet50.a1_in1k",
            )
        return ModelName("tv", raw, raw)
    arch = raw.split(".", 1)[0]
    if not timm.is_model(raw) and not timm.is_model(arch):
        import difflib

        names = [*timm.list_models(), *(f"tv:{n}" for n in TV_RESNETS)]  # timm's names and torchvision's
        close = difflib.get_close_matches(raw, names, n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see `timm.list_models('resnet*')`"
        raise UsageError(f"--model {model!r} is not a timm or torchvision model", hint)
    return ModelName("timm", arch, raw)


# --------------------------------------------------------------------------------------------- builder


def build_backbone(
    model: str = "resnet50",
    weights: str = "imagenet",
    image_size: int | None = None,
) -> Backbone:
    """Build the headless backbone ``model`` with ``weights`` = ``imagenet`` | ``none`` | a file/dir path.

    The transform is the model's own eval config (timm data config, or torchvision weights' transforms),
    or the one recorded in a checkpoint this toolkit saved; ``image_size`` overrides its input size."""
    import timm

    name = parse_model_name(model)
    w = str(weights)
    recorded: TransformConfig | None = None
    if w.lower() == "imagenet":
        if name.source == "tv":
            net, transform, weights_id = _load_torchvision(name.arch)
        else:
            net = _load_timm_pretrained(name.timm_name)
            transform = _timm_transform(net)
            weights_id = f"timm:{net.pretrained_cfg.get('architecture', name.arch)}." + str(
                net.pretrained_cfg.get("tag", "")
            )
    elif w.lower() == "none":
        torch.manual_seed(INIT_SEED)
        net = timm.create_model(name.timm_name, pretrained=False, num_classes=0)
        transform = _tv_default_transform() if name.source == "tv" else _timm_transform(net)
        weights_id = f"random:seed={INIT_SEED}"
    else:
        torch.manual_seed(INIT_SEED)
        net = timm.create_model(name.timm_name, pretrained=False, num_classes=0)
        state, weights_id, meta = load_state_file(w)
        _load_into(net, state, w)
        transform = _tv_default_transform() if name.source == "tv" else _timm_transform(net)
        if meta.get("transform"):
            recorded = TransformConfig.from_dict(json.loads(meta["transform"]))
        if meta.get("arch") and meta["arch"] != name.arch:
            raise WeightsError(
                f"{w} holds a {meta['arch']} backbone, not {name.arch}",
                f"use --model {meta.get('model', meta['arch'])}",
            )
    if recorded is not None:
        transform = recorded
    if image_size is not None:
        if image_size < 16:
            raise UsageError(f"--image-size {image_size} is too small", "use 32 or more")
        transform = transform.with_size(int(image_size))
    net.eval()
    identity = BackboneIdentity(
        model=name.display,
        arch=name.arch,
        weights=w,
        weights_id=weights_id,
        transform=transform,
        num_features=int(net.num_features),
    )
    stages = [d["module"] for d in net.feature_info]
    return Backbone(net=net, identity=identity, stages=stages)


def backbone_from_identity(identity: BackboneIdentity, weights: str | None = None) -> Backbone:
    """Rebuild the backbone a cache/head was made with (``weights`` overrides where the file moved), and
    check that what loads is what was recorded."""
    from ..base import IdentityMismatch

    name = identity.model
    bb = build_backbone(name, weights or identity.weights)
    if bb.identity.transform != identity.transform:
        bb = Backbone(net=bb.net, identity=with_transform(bb.identity, identity.transform), stages=bb.stages)
    diffs = identity.differences(bb.identity)
    if diffs:
        raise IdentityMismatch(
            f"the backbone loaded from {weights or identity.weights!r} is not the one recorded ({'; '.join(diffs)})",
            "pass --weights with the file the cache/head was made with",
        )
    return bb


def with_transform(identity: BackboneIdentity, transform: TransformConfig) -> BackboneIdentity:
    d = identity.to_dict()
    d["transform"] = transform.to_dict()
    return BackboneIdentity.from_dict(d)


def _timm_transform(net: Any) -> TransformConfig:
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=net)
    size = int(cfg["input_size"][-1])
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    return TransformConfig(
        input_size=size,
        resize_size=math.floor(size / crop_pct),
        interpolation=str(cfg.get("interpolation", "bilinear")),
        mean=tuple(float(x) for x in cfg["mean"]),  # type: ignore[arg-type]
        std=tuple(float(x) for x in cfg["std"]),  # type: ignore[arg-type]
    )


def _tv_default_transform() -> TransformConfig:
    return TransformConfig()


# --------------------------------------------------------------------------------------------- weights


def _offline_error(what: str, where: str, model: str) -> WeightsError:
    return WeightsError(
        f"cannot load {what} weights for {model}: no network, and they are not in the local cache ({where})",
        "either (1) run once where the hub is reachable (the file is then cached there), or (2) pass "
        "--weights PATH to a local checkpoint (.pth/.safetensors, or a directory `rt finetune` wrote), "
        "or (3) pass --weights none for a random init",
    )


def host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """True when a TCP connection to ``host`` opens within ``timeout`` seconds (DNS included)."""
    if os.environ.get("RT_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _load_timm_pretrained(timm_name: str) -> Any:
    import huggingface_hub.constants as hub_constants
    import timm

    # The files already in the local cache are checked (once: weights_cache remembers) and then loaded
    # without touching the network; only a cache miss goes to the hub.
    cached = hf_cached_weights(timm_name)
    for f in cached:
        check_weights_file(f, f"timm {timm_name}", hf_fix(f))
    saved = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        return timm.create_model(timm_name, pretrained=True, num_classes=0)
    except Exception as exc:
        cache_miss = exc
    finally:
        hub_constants.HF_HUB_OFFLINE = saved
    if cached:  # the file is there, yet it does not load: say so, not "offline" or "download failed"
        why = f"cannot be loaded: {type(cache_miss).__name__}: {str(cache_miss).strip()[:200]}"
        raise damaged(cached[0], f"timm {timm_name}", why, hf_fix(cached[0])) from cache_miss
    if saved or not host_reachable("huggingface.co"):
        raise _offline_error("timm pretrained", hub_constants.HF_HUB_CACHE, timm_name) from cache_miss
    try:
        return timm.create_model(timm_name, pretrained=True, num_classes=0)
    except Exception as exc:
        raise WeightsError(
            f"downloading timm weights for {timm_name} failed: {exc}",
            "check the name has pretrained weights (timm.list_pretrained), or use --weights PATH / none",
        ) from exc


def _load_torchvision(arch: str) -> tuple[Any, TransformConfig, str]:
    import timm
    import torchvision.models as tvm

    enum = tvm.get_model_weights(arch)[TV_DEFAULT_WEIGHTS[arch]]
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cached = hub_dir / os.path.basename(enum.url)
    if cached.exists():  # checked against the hash in its name (once), loaded without the network
        state = load_torch_hub_file(cached, f"torchvision {enum}")
    elif not host_reachable("download.pytorch.org"):
        raise _offline_error("torchvision", str(hub_dir), f"tv:{arch}")
    else:
        try:
            state = enum.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:
            raise WeightsError(
                f"downloading torchvision weights {enum} failed: {exc}", "retry, or use --weights PATH / none"
            ) from exc
        if cached.exists():
            remember(cached)  # torch.hub checked the download's hash
    net = timm.create_model(arch, pretrained=False, num_classes=0)
    _load_into(net, state, str(enum))
    t = enum.transforms()
    interp = str(getattr(t.interpolation, "value", t.interpolation))
    transform = TransformConfig(
        input_size=int(t.crop_size[0]),
        resize_size=int(t.resize_size[0]),
        interpolation=interp,
        mean=tuple(float(x) for x in t.mean),  # type: ignore[arg-type]
        std=tuple(float(x) for x in t.std),  # type: ignore[arg-type]
    )
    return net, transform, f"torchvision:{enum}"


def load_state_file(path: str | Path) -> tuple[dict[str, Any], str, dict[str, str]]:
    """Load a state dict safely (safetensors, or ``torch.load(weights_only=True)``: no pickled code runs).

    ``path`` may be a directory written by this toolkit (its ``backbone.safetensors`` is used). Returns the
    tensors, ``sha256:<hex>`` of the file, and the safetensors metadata (empty for .pth)."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / BACKBONE_FILE).exists():
            raise WeightsError(
                f"--weights {path}: the directory has no {BACKBONE_FILE}",
                "point --weights at a directory `rt finetune` wrote, or at a .pth/.safetensors file",
            )
        p = p / BACKBONE_FILE
    if not p.exists():
        raise WeightsError(
            f"--weights {path}: no such file",
            "use --weights imagenet, --weights none, or the path of a .pth/.safetensors checkpoint",
        )
    digest = "sha256:" + sha256_file(p)
    meta: dict[str, str] = {}
    try:
        if p.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:
                meta = dict(f.metadata() or {})
                state: Any = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"--weights {p}: cannot be read as a checkpoint ({type(exc).__name__}: {str(exc)[:200]})",
            "checkpoints must be tensors only (safetensors or torch.save(state_dict)); pickled code is "
            "refused. Re-save it with torch.save(model.state_dict(), path)",
        ) from exc
    return _unwrap_state(state, p), digest, meta


def _unwrap_state(state: Any, path: Path) -> dict[str, Any]:
    for key in ("state_dict", "model_state_dict", "model", "backbone", "net"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"--weights {path}: no state dict (name -> tensor) found in the file")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "model.", "backbone.", "net."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _load_into(net: Any, state: dict[str, Any], source: str) -> None:
    """Strictly load a backbone state dict, dropping the classifier (any number of outputs)."""
    classifier = str(net.pretrained_cfg.get("classifier", "fc"))
    state = {k: v for k, v in state.items() if not (k == classifier or k.startswith(classifier + "."))}
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} of another shape (e.g. {wrong[0]})")
        raise WeightsError(
            f"the weights in {source} do not fit {net.pretrained_cfg.get('architecture')}: " + "; ".join(parts),
            "pass the --model the checkpoint was trained as (e.g. resnet18 vs resnet50)",
        )
    net.load_state_dict(state, strict=True)


def save_backbone(net: Any, path: Path, identity: BackboneIdentity) -> None:
    """Write the backbone's state dict as safetensors with its identity in the metadata, so that
    ``--weights path`` (or the directory holding it) loads it back as a pretrained backbone."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {
        "format": "resnet_transfer.backbone",
        "arch": identity.arch,
        "model": identity.model,
        "transform": json.dumps(identity.transform.to_dict()),
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def pooled_stage_features(backbone: Backbone, x: torch.Tensor, stages: list[str]) -> dict[str, torch.Tensor]:
    """One forward pass of ``backbone.net`` over ``x``: the globally average-pooled output of each stage in
    ``stages`` (``(N, C_stage)`` float32 tensors), keyed by stage name.

    A stage named twice is computed once; a name that is not a stage is a :class:`UsageError`. The same
    pooling as ``rt extract --pool-stages`` (mean over H and W of the stage's output)."""
    names = [backbone.check_stage(s, "stage") for s in dict.fromkeys(stages)]
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(_module: Any, _inp: Any, output: torch.Tensor) -> None:
            captured[name] = output.float().mean(dim=(2, 3))

        return hook

    hooks = [backbone.net.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    try:
        backbone.net(x)
    finally:
        for h in hooks:
            h.remove()
    return {n: captured[n] for n in names}
