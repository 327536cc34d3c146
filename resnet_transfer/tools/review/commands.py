"""The commands that close the loop after a review: `rt extract` on the manifest (with the options that made
the cache, so its rows are reused), then `rt fit-head`."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any


def extract_options(cache: Any) -> list[str]:
    """The `rt extract` options that give rows comparable with ``cache``'s (model, weights, input size,
    stored stages, precision, dtype, recorded root): without them the next run would refuse the cache."""
    from ...base import precision_kind

    ident = cache.identity
    out = ["--model", ident.model, "--weights", ident.weights, "--image-size", str(ident.transform.input_size)]
    for stage in cache.stages:
        out += ["--cut", stage]
    if cache.pooled_stages:
        out += ["--pool-stages", ",".join(cache.pooled_stages)]
    if cache.precision:
        out += ["--precision", precision_kind(cache.precision)]
    if cache.feature_dtype != "float16":
        out += ["--dtype", cache.feature_dtype]
    if (cache.attrs or {}).get("root"):
        out.append("--record-root")
    return out


def short(p: str | Path) -> str:
    """``p`` relative to the working directory when it is under it (shorter commands to copy), quoted."""
    try:
        text = str(Path(p).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        text = str(p)
    return shlex.quote(text)


def loop_commands(manifest: Path, cache: Path, options: list[str], outside: int, head: Path | None) -> list[str]:
    """``rt extract ...`` (computes nothing for relabelled or excluded rows) and ``rt fit-head ...``."""
    extract = ["rt extract --data", short(manifest), "--out", short(cache), *map(shlex.quote, options)]
    if outside:
        extract.append("--allow-outside")
    fit = f"rt fit-head --cache {short(cache)} --out {short(head) + ' --overwrite' if head else 'HEAD_DIR'}"
    return [" ".join(extract), fit]
