"""`rt review`'s server through an HTTP client: the token, the Host check, what files it serves (and what it
refuses), the filters, the side panel's data, and changes going to the manifest."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from review_data import COPY, COPY_OF, FLIPPED, UNLABELLED, ReviewSet, make_review_set
from starlette.testclient import TestClient

from resnet_transfer.tools.review import ReviewConfig, ThumbCache, build_state, create_app

TOKEN = "s3cret-token"
HOST = "127.0.0.1:8123"


@pytest.fixture(scope="module")
def review_set(tmp_path_factory: pytest.TempPathFactory) -> ReviewSet:
    return make_review_set(tmp_path_factory.mktemp("review"))


@pytest.fixture
def client(review_set: ReviewSet, tmp_path: Path) -> Iterator[TestClient]:
    state = build_state(
        ReviewConfig(
            cache=review_set.cache,
            head=review_set.head,
            audit=review_set.audit,
            root=review_set.root,
            manifest=tmp_path / "fixes.csv",
        )
    )
    app = create_app(state, TOKEN, {HOST}, ThumbCache(tmp_path / "thumbs"))
    with TestClient(app, base_url=f"http://{HOST}") as c:
        c.state = state  # type: ignore[attr-defined]
        yield c
    state.manifest.close()


def _authed(c: TestClient) -> TestClient:
    c.cookies.set("rt_review", TOKEN)
    return c


# ------------------------------------------------------------------------------------------- security


def test_no_token_or_a_wrong_one_is_refused(client: TestClient) -> None:
    for path in ("/", "/api/info", "/api/rows", "/train/thumb/s/cat/000.png", "/static/app.js"):
        assert client.get(path).status_code == 403
        assert client.get(path, params={"token": "wrong"}).status_code == 403
    client.cookies.set("rt_review", "wrong")
    for path in ("/", "/api/info", "/api/rows", "/train/thumb/s/cat/000.png", "/static/app.js"):
        assert client.get(path).status_code == 403
    client.cookies.clear()
    assert "token" in client.get("/").text


def test_the_token_in_the_url_sets_a_cookie_and_leaves_the_address(client: TestClient) -> None:
    r = client.get("/", params={"token": TOKEN}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert f"rt_review={TOKEN}" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    page = client.get("/")  # the cookie alone now
    assert page.status_code == 200 and TOKEN in page.text  # the page carries it for its POST header
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"


def test_a_foreign_host_is_refused_even_with_the_token(client: TestClient) -> None:
    """DNS rebinding: a page of evil.example whose name now points at 127.0.0.1 reaches the port, but its
    requests say Host: evil.example."""
    for host in ("evil.example:8123", "evil.example", "127.0.0.1:9999", "127.0.0.1"):
        r = client.get("/api/info", params={"token": TOKEN}, headers={"host": host})
        assert r.status_code == 403, host
        assert "Host" in r.text


def test_changes_need_the_token_header_not_only_the_cookie(client: TestClient) -> None:
    c = _authed(client)
    body = {"row": 0, "label": "dog"}
    assert c.post("/api/label", json=body).status_code == 403  # a cross-site form would send the cookie
    assert c.post("/api/label", json=body, headers={"X-RT-Token": "wrong"}).status_code == 403
    r = c.post("/api/label", json=body, headers={"X-RT-Token": TOKEN, "Origin": "http://evil.example"})
    assert r.status_code == 403
    assert not c.state.manifest.path.exists()  # type: ignore[attr-defined]
    r = c.post("/api/label", json=body, headers={"X-RT-Token": TOKEN, "Origin": f"http://{HOST}"})
    assert r.status_code == 200 and r.json()["row"]["label"] == "dog"


@pytest.mark.parametrize(
    "path",
    [
        "/train/file/../train.h5",
        "/train/file/cat/../../train.h5",
        "/train/file/cat/%2e%2e/%2e%2e/train.h5",
        "/train/file/cat%2F000.png",
        "/train/file/cat%2f..%2f..%2ftrain.h5",
        "/train/file/cat%5C000.png",
        "/train/file//etc/passwd",
        "/train/file/%2Fetc%2Fpasswd",
        "/train/thumb/s/..%2F..%2Fetc%2Fpasswd",
        "/train/file/cat/000.png%00.png",
        "/train/thumb/x/cat/000.png",
        "/test/file/cat/000.png",
        "/nope/file/cat/000.png",
    ],
)
def test_traversal_and_encoded_separators_are_not_found(client: TestClient, path: str) -> None:
    r = _authed(client).get(path)
    assert r.status_code == 404, (path, r.status_code)


def test_only_files_the_cache_lists_inside_the_root_are_served(
    client: TestClient, review_set: ReviewSet, tmp_path: Path
) -> None:
    c = _authed(client)
    ok = c.get("/train/file/cat/000.png")
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
    assert ok.content == (review_set.root / "cat/000.png").read_bytes()
    thumb = c.get("/train/thumb/s/cat/000.png")
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"  # a JPEG
    (review_set.root / "cat" / "not-listed.png").write_bytes((review_set.root / "cat/000.png").read_bytes())
    assert c.get("/train/file/cat/not-listed.png").status_code == 404  # under the root, but not a cache row


def test_a_listed_symlink_out_of_the_root_is_not_followed(tmp_path: Path) -> None:
    rs = make_review_set(tmp_path / "set", audit=False)
    secret = tmp_path / "secret.png"
    secret.write_bytes((rs.root / "cat/001.png").read_bytes())
    target = rs.root / rs.paths[0]
    target.unlink()
    os.symlink(secret, target)  # a row of the cache whose file now points outside the image folder
    inside = rs.root / rs.paths[1]
    inside.unlink()
    os.symlink(rs.root / rs.paths[3], inside)  # a symlink within the folder is fine
    state = build_state(ReviewConfig(cache=rs.cache, root=rs.root, manifest=tmp_path / "m.csv"))
    with TestClient(create_app(state, TOKEN, {HOST}, ThumbCache(tmp_path / "t")), base_url=f"http://{HOST}") as c:
        c.cookies.set("rt_review", TOKEN)
        assert c.get(f"/train/file/{rs.paths[0]}").status_code == 404
        assert c.get(f"/train/thumb/s/{rs.paths[0]}").status_code == 404
        assert c.get(f"/train/file/{rs.paths[1]}").status_code == 200
    state.manifest.close()


def test_a_real_server_checks_host_and_token_on_its_socket(review_set: ReviewSet, tmp_path: Path) -> None:
    from resnet_transfer.tools.review import open_review

    server = open_review(
        ReviewConfig(cache=review_set.cache, root=review_set.root, manifest=tmp_path / "m.csv", thumbs=tmp_path / "t")
    )
    assert server.host == "127.0.0.1" and server.loopback
    assert server.url.startswith(f"http://127.0.0.1:{server.port}/?token=")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        for _ in range(100):
            try:
                httpx.get(base + "/", timeout=2)
                break
            except httpx.TransportError:
                threading.Event().wait(0.05)
        assert httpx.get(base + "/api/info", timeout=5).status_code == 403
        with httpx.Client(follow_redirects=True, timeout=5) as browser:
            r = browser.get(server.url)  # the redirect drops the token from the address, the cookie carries it
            assert r.status_code == 200 and "rt review" in r.text and str(r.url) == base + "/"
            assert browser.get(base + "/api/state").status_code == 200
        r = httpx.get(base + "/api/info", params={"token": server.token}, headers={"Host": "rebound.example"})
        assert r.status_code == 403
        r = httpx.get(f"http://localhost:{server.port}/api/info", params={"token": server.token}, timeout=5)
        assert r.status_code == 200 and r.json()["rows"] == len(review_set.paths)
    finally:
        server.stop()
        thread.join(10)
    assert not thread.is_alive()


# ------------------------------------------------------------------------------------------- the views


def test_filters_narrow_the_rows(client: TestClient, review_set: ReviewSet) -> None:
    c = _authed(client)
    total = c.get("/api/rows").json()["total"]
    assert total == len(review_set.paths)
    cats = c.get("/api/rows", params={"class": "cat", "limit": 500}).json()
    assert cats["total"] == review_set.labels.count(0)
    assert {r["label"] for r in cats["rows"]} == {"cat"}
    unl = c.get("/api/rows", params={"class": "(unlabelled)"}).json()
    assert [r["row"] for r in unl["rows"]] == [UNLABELLED]
    errors = c.get("/api/rows", params={"finding": "label_error"}).json()
    assert errors["rows"][0]["row"] == FLIPPED  # in the audit's order: the most likely first
    assert errors["rows"][0]["badges"][0] == {"kind": "label_error", "text": "→ cat?"}
    dups = {r["row"] for r in c.get("/api/rows", params={"finding": "duplicate"}).json()["rows"]}
    assert {COPY, COPY_OF} <= dups
    wrong = c.get("/api/rows", params={"verdict": "wrong"}).json()
    assert wrong["rows"][0]["row"] == FLIPPED and wrong["rows"][0]["pred"]["label"] == "cat"
    losses = [r["loss"] for r in wrong["rows"]]
    assert losses == sorted(losses, reverse=True)  # wrong: highest loss first
    unsure = c.get("/api/rows", params={"verdict": "uncertain", "limit": 500}).json()["rows"]
    conf = [r["pred"]["p"] for r in unsure]
    assert conf == sorted(conf) and all(p < 0.6 for p in conf)
    by_conf = c.get("/api/rows", params={"sort": "confidence", "limit": 500}).json()["rows"]
    assert [r["pred"]["p"] for r in by_conf] == sorted((r["pred"]["p"] for r in by_conf), reverse=True)
    assert c.get("/api/rows", params={"sort": "sideways"}).status_code == 400


def test_pages_cover_every_row_once(client: TestClient, review_set: ReviewSet) -> None:
    c = _authed(client)
    seen = []
    for offset in range(0, len(review_set.paths), 7):
        seen += [r["row"] for r in c.get("/api/rows", params={"offset": offset, "limit": 7}).json()["rows"]]
    assert seen == list(range(len(review_set.paths)))


def test_the_side_panel_has_probabilities_findings_and_cosine_neighbours(
    client: TestClient, review_set: ReviewSet
) -> None:
    c = _authed(client)
    d = c.get(f"/api/row/{COPY_OF}").json()
    assert d["neighbours"][0]["row"] == COPY and d["neighbours"][0]["cosine"] == pytest.approx(1.0, abs=1e-3)
    X = review_set.X - review_set.X.mean(0)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    sims = Xn @ Xn[FLIPPED]
    sims[FLIPPED] = -np.inf
    d = c.get(f"/api/row/{FLIPPED}").json()
    assert [n["row"] for n in d["neighbours"]] == list(np.argsort(-sims, kind="stable")[:8])
    assert all(n["label"] == "cat" for n in d["neighbours"][:3])  # it sits among cats
    assert d["probs"][0]["label"] == "cat" and sum(p["p"] for p in d["probs"]) == pytest.approx(1.0, abs=1e-3)
    assert d["findings"][0]["kind"] == "label_error" and d["findings"][0]["suggested"] == "cat"
    dup = c.get(f"/api/row/{COPY}").json()["findings"]
    assert any(f["kind"] == "duplicate" and f["partner"]["row"] == COPY_OF for f in dup)


def test_changes_and_undo_reach_the_manifest_and_the_views(client: TestClient) -> None:
    c = _authed(client)
    h = {"X-RT-Token": TOKEN}
    r = c.post("/api/label", json={"row": FLIPPED, "label": "cat"}, headers=h).json()
    assert r["row"]["status"] == "relabelled" and r["pending"] == 1
    assert FLIPPED not in [x["row"] for x in c.get("/api/rows", params={"verdict": "wrong"}).json()["rows"]]
    r = c.post("/api/exclude", json={"row": 5, "excluded": True}, headers=h).json()
    assert r["row"]["status"] == "excluded" and r["pending"] == 2
    assert [x["row"] for x in c.get("/api/rows", params={"status": "excluded"}).json()["rows"]] == [5]
    text = c.state.manifest.path.read_text()  # type: ignore[attr-defined]
    assert "dog/002.png,cat" in text and "cat/005.png" not in text
    assert c.post("/api/undo", headers=h).json()["row"]["row"] == 5
    assert "cat/005.png,cat" in c.state.manifest.path.read_text()  # type: ignore[attr-defined]
    bad = c.post("/api/label", json={"row": 1, "label": "unicorn"}, headers=h)
    assert bad.status_code == 400 and "unicorn" in bad.json()["error"]
    assert c.post("/api/label", json={"row": 10**6, "label": "cat"}, headers=h).status_code == 400
    assert c.get("/api/state").json()["pending"] == 1


def test_two_tabs_lose_nothing(client: TestClient) -> None:
    """Two pages (two clients with the one token) change different rows in turn: every change is kept."""
    c = _authed(client)
    other = TestClient(c.app, base_url=f"http://{HOST}", cookies={"rt_review": TOKEN})
    h = {"X-RT-Token": TOKEN}
    for i in range(6):
        (c if i % 2 else other).post("/api/label", json={"row": i, "label": "fox"}, headers=h)
    text = c.state.manifest.path.read_text()  # type: ignore[attr-defined]
    assert all(f"{p},fox" in text for p in ("cat/000.png", "cat/001.png", "dog/002.png", "cat/005.png"))
    assert other.get("/api/state").json()["version"] == c.get("/api/state").json()["version"]


def test_memory_stays_bounded_when_every_row_is_viewed(client: TestClient, review_set: ReviewSet) -> None:
    c = _authed(client)
    state = c.state  # type: ignore[attr-defined]
    for i in range(len(review_set.paths)):
        c.get(f"/api/row/{i}")
    for cls in ("cat", "dog", "fox", "(unlabelled)", ""):
        for sort in ("row", "loss", "confidence", "confidence_asc"):
            c.get("/api/rows", params={"class": cls, "sort": sort})
    assert len(state._queries) <= 8
    assert state.neighbours.cache_info().maxsize == 512


def test_missing_images_show_a_placeholder_and_say_where_they_were_looked_for(tmp_path: Path) -> None:
    rs = make_review_set(tmp_path / "set", audit=False)
    gone = tmp_path / "moved-away"
    rs.root.rename(gone)
    state = build_state(ReviewConfig(cache=rs.cache, root=rs.root, manifest=tmp_path / "m.csv"))
    with TestClient(create_app(state, TOKEN, {HOST}, ThumbCache(tmp_path / "t")), base_url=f"http://{HOST}") as c:
        c.cookies.set("rt_review", TOKEN)
        info = c.get("/api/info").json()
        assert info["images"]["found"] == 0 and info["images"]["root"] == str(rs.root)
        assert any(str(rs.root) in n and "--root" in n for n in info["notes"])
        row = c.get("/api/rows").json()["rows"][0]
        assert row["exists"] is False
        assert c.get(row["thumb"]).status_code == 404
    state.manifest.close()


def test_the_page_and_its_assets_come_from_this_server_only(client: TestClient) -> None:
    c = _authed(client)
    page = c.get("/").text
    for asset in ("/static/app.js", "/static/style.css", "/static/favicon.svg"):
        assert asset in page and c.get(asset).status_code == 200
    assert "http" not in page.replace("http-equiv", "")  # no CDN, no external fonts
    js = c.get("/static/app.js").text
    assert "X-RT-Token" in js and "http://" not in js and "https://" not in js
    assert c.get("/static/../serve.py").status_code == 404


def test_info_names_the_loop_commands_with_the_cache_options(client: TestClient, review_set: ReviewSet) -> None:
    info = _authed(client).get("/api/info").json()
    extract, fit = info["commands"]
    assert (
        extract.startswith("rt extract --data ") and "--model timm:resnet18 --weights none --image-size 32" in extract
    )
    assert f"--out {review_set.cache}" in extract or "--out train.h5" in extract
    assert fit.startswith("rt fit-head --cache ") and "--overwrite" in fit
    assert json.dumps(info)  # plain JSON


def test_including_an_excluded_image_brings_back_its_fixed_label(client: TestClient) -> None:
    c = _authed(client)
    h = {"X-RT-Token": TOKEN}
    c.post("/api/label", json={"row": 3, "label": "fox"}, headers=h)
    c.post("/api/exclude", json={"row": 3, "excluded": True}, headers=h)
    r = c.post("/api/exclude", json={"row": 3, "excluded": False}, headers=h).json()
    assert r["row"]["label"] == "fox" and r["row"]["status"] == "relabelled"
    r = c.post("/api/exclude", json={"row": 3, "excluded": False}, headers=h).json()  # not excluded: no change
    assert r["row"]["label"] == "fox"
    c.post("/api/exclude", json={"row": 4, "excluded": True}, headers=h)
    assert c.post("/api/exclude", json={"row": 4, "excluded": False}, headers=h).json()["row"]["label"] == "cat"


def test_neighbours_read_from_the_cache_equal_the_in_memory_ones(review_set: ReviewSet) -> None:
    from resnet_transfer.cache import FeatureCache
    from resnet_transfer.tools.review.vectors import Vectors

    with FeatureCache(review_set.cache) as fc:
        mem, disk = Vectors(fc), Vectors(fc, memory_budget=0)
        assert mem.in_memory and not disk.in_memory
        for row in (0, FLIPPED, COPY, 29):
            a, b = mem.neighbours(row), disk.neighbours(row)
            assert [j for j, _ in a] == [j for j, _ in b]
            assert np.allclose([c for _, c in a], [c for _, c in b], atol=1e-5)
