"""The feature comparison child of `python -m benchmarks extract`: bf16 vs fp32, rt's fused resize+crop vs
torchvision's Resize + CenterCrop, the compiled vs the eager forward, and on 12 MP JPEGs PIL draft vs a
full decode vs torchvision's decoder (with their decode rates on one core)."""

from __future__ import annotations

from benchmarks.common import TORCH_PRELUDE as _PRELUDE

ACCURACY = (
    _PRELUDE
    + """
import numpy as np
from resnet_transfer.backbone import build_backbone
from resnet_transfer.images import ImageDataset, collate, eval_transform, list_images
bb = build_backbone(ARGS["model"], "none", ARGS.get("size"))
net = bb.net.eval().to(memory_format=torch.channels_last)
tf = eval_transform(bb.transform)

def feats(folder, precision, draft=None, transform=None):
    ds = ImageDataset(list_images(folder), transform or tf, draft=draft)
    xs, _, _ = collate([ds[i] for i in range(len(ds))])
    out = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for lo in range(0, len(xs), 32):
            out.append(net(xs[lo:lo + 32].contiguous(memory_format=torch.channels_last)).float())
    return torch.cat(out)

def cos(a, b):
    c = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return {"min": float(c.min()), "median": float(c.median())}

ref = feats(ARGS["data"], "fp32")
res = {"bf16_vs_fp32": cos(feats(ARGS["data"], "bf16"), ref)}
# rt's fused resize+crop vs torchvision's Resize + CenterCrop (the transform a user would write)
import torchvision.transforms as T
from resnet_transfer.images.transforms import _interpolation
c = bb.transform
two_step = T.Compose([T.Resize(c.resize_size, interpolation=_interpolation(c.interpolation)),
                      T.CenterCrop(c.input_size), T.ToTensor(), T.Normalize(c.mean, c.std)])
res["fused_vs_torchvision"] = cos(ref, feats(ARGS["data"], "fp32", transform=two_step))
if ARGS.get("compiled"):  # the compiled forward (bf16) vs eager bf16 on the same photos
    from resnet_transfer.backbone import compiled_forward
    from resnet_transfer.base import resolve_device
    xs = collate([ImageDataset(list_images(ARGS["data"]), tf)[i] for i in range(64)])[0]
    xs = xs.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        eager = compiled_forward(net, torch.device("cpu"), "bf16", "off")
        comp = compiled_forward(net, torch.device("cpu"), "bf16", "on", 64, bb.identity.to_json())
        res["compiled_vs_eager_bf16"] = cos(torch.cat([comp(xs[:32]), comp(xs[32:])]), eager(xs))
if ARGS.get("phone"):  # 12 MP JPEGs: PIL full decode, PIL draft (DCT-domain downscale), torchvision's decoder
    phone = ARGS["phone"]
    full = feats(phone, "fp32")
    ds_full = ImageDataset(list_images(phone), tf)
    ds_draft = ImageDataset(list_images(phone), tf, draft=bb.transform.resize_size)
    def rate(fn, n):
        t = time.perf_counter()
        for i in range(n):
            fn(i)
        return n / (time.perf_counter() - t)
    import torchvision.io as tio
    import torchvision.transforms.v2.functional as TF
    files = [ds_full.path(i) for i in range(len(ds_full))]
    mean = torch.tensor(c.mean).view(3, 1, 1) * 255
    std = torch.tensor(c.std).view(3, 1, 1) * 255
    def tv(i):  # libjpeg-turbo full decode to uint8, torch's uint8 antialiased resize, crop, normalise
        img = tio.decode_jpeg(tio.read_file(str(files[i])), mode=tio.ImageReadMode.RGB)
        img = TF.center_crop(TF.resize(img, c.resize_size, antialias=True), c.input_size)
        return (img.float() - mean) / std
    k = min(len(files), 16)
    res["draft_vs_full"] = cos(feats(phone, "fp32", draft=bb.transform.resize_size), full)
    xs_tv = torch.stack([tv(i) for i in range(len(files))]).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        res["tv_decode_vs_pil_full"] = cos(net(xs_tv).float(), full)
    torch.set_num_threads(1)  # per-core decode cost: rt decodes in threads, one image each
    res["phone_decode_img_s_one_core"] = {"pil_full": rate(lambda i: ds_full[i], k),
                                          "pil_draft": rate(lambda i: ds_draft[i], k),
                                          "tv_decode_jpeg_torch_resize": rate(tv, k)}
print(json.dumps(res))
"""
)
