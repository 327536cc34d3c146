"""The loop `rt review` exists for, end to end with the real commands: extract -> fit-head -> review (relabel and
exclude through the page's own API) -> extract on the manifest computes nothing -> fit-head refits."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from conftest import make_image_folder
from starlette.testclient import TestClient
from typer.testing import CliRunner

from resnet_transfer.cache import FeatureCache
from resnet_transfer.cli import app
from resnet_transfer.tools.review import ReviewConfig, ThumbCache, build_state, create_app

runner = CliRunner()
BACKBONE = ["--model", "resnet18", "--weights", "none", "--image-size", "32"]


def _rt(*args: object) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def test_relabel_in_the_page_then_extract_computes_nothing_and_fit_head_refits(
    tmp_path: Path,
) -> None:
    data = make_image_folder(tmp_path / "pets", per_class=5, seed=3)
    cache, head = tmp_path / "pets.h5", tmp_path / "head"
    _rt("extract", "--data", data, "--out", cache, *BACKBONE, "--record-root")
    _rt("fit-head", "--cache", cache, "--out", head)
    with FeatureCache(cache) as fc:
        before = dict(zip(fc.paths, fc.labels.tolist()))
        classes = list(fc.classes)
    relabel, drop = "circle/circle_3_001.png", "square/square_3_002.webp"

    state = build_state(ReviewConfig(cache=cache, head=head))  # the images' folder: the root the cache recorded
    assert state.images.found == state.images.sampled > 0
    client = TestClient(create_app(state, "t", {"testserver"}, ThumbCache(tmp_path / "thumbs")))
    client.get("/", params={"token": "t"})  # as the browser: the printed URL, then the cookie
    h = {"X-RT-Token": "t"}
    rows = {r["path"]: r["row"] for r in client.get("/api/rows", params={"limit": 500}).json()["rows"]}
    assert client.post("/api/label", json={"row": rows[relabel], "label": "triangle"}, headers=h).status_code == 200
    assert client.post("/api/exclude", json={"row": rows[drop], "excluded": True}, headers=h).status_code == 200
    extract_cmd, fit_cmd = client.get("/api/info").json()["commands"]
    state.manifest.close()
    manifest = data / "review.csv"
    assert state.manifest.path == manifest  # the default: beside the images, so paths are the cache's own

    # the command the page shows, as the user would paste it
    args = shlex.split(extract_cmd)
    assert args[:2] == ["rt", "extract"]
    out = _rt(*args[1:])
    assert "added 0, changed 0, removed 1, relabelled 1, moved 0" in out
    assert "0 computed" in out
    with FeatureCache(cache) as fc:
        after = dict(zip(fc.paths, fc.labels.tolist()))
        assert fc.last_run["computed"] == 0
        assert fc.classes[:3] == classes
    assert drop not in after and len(after) == len(before) - 1
    assert classes[after[relabel]] == "triangle" and classes[before[relabel]] == "circle"
    assert all(after[p] == before[p] for p in after if p != relabel)

    args = shlex.split(fit_cmd)
    assert args[:2] == ["rt", "fit-head"]
    _rt(*args[1:])
    report = json.loads((head / "report.json").read_text())
    assert report["n_train"] + report["n_val"] == len(after)
    assert report["class_counts"]["triangle"] == sum(classes[y] == "triangle" for y in after.values())
    shutil.rmtree(tmp_path / "thumbs", ignore_errors=True)
