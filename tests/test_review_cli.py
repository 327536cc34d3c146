"""`rt review` as a command: its help teaches it, a missing extra says what to install, a non-loopback bind
warns, a bad input is one clear line, and Ctrl-C ends it with the loop's next commands."""

from __future__ import annotations

import builtins
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from review_data import make_review_set
from typer.testing import CliRunner

from resnet_transfer.base import Reporter, set_reporter
from resnet_transfer.cli import app
from resnet_transfer.tools.review import MissingExtra, ReviewConfig, open_review, require_extra

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def test_help_teaches_the_tool() -> None:
    res = runner.invoke(app, ["review", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    text = res.output
    for needle in ("Examples", "rt review --cache pets.h5", "Keys", "1-9", "x excludes", "u undoes", "--manifest"):
        assert needle in text, needle
    assert "127.0.0.1" in text and "token" in text
    assert "review" in runner.invoke(app, ["--help"]).output


def test_a_missing_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = builtins.__import__

    def no_starlette(name: str, *args: object, **kwargs: object) -> object:
        if name.split(".")[0] in ("starlette", "uvicorn"):
            raise ImportError(f"No module named {name!r}", name=name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_starlette)
    with pytest.raises(MissingExtra) as exc:
        require_extra()
    assert exc.value.hint == "pip install 'resnet_transfer[review]'"
    res = runner.invoke(app, ["review", "--cache", str(tmp_path / "x.h5")])
    assert res.exit_code == 2
    assert "pip install 'resnet_transfer[review]'" in res.output


def test_a_missing_cache_is_one_line(tmp_path: Path) -> None:
    res = runner.invoke(app, ["review", "--cache", str(tmp_path / "nope.h5")])
    assert res.exit_code == 2 and "nope.h5" in res.output and "Traceback" not in res.output


def test_binding_beyond_loopback_warns(tmp_path: Path) -> None:
    rs = make_review_set(tmp_path, audit=False)
    rep = Reporter()
    previous = set_reporter(rep)
    try:
        server = open_review(
            ReviewConfig(
                cache=rs.cache, root=rs.root, host="0.0.0.0", manifest=tmp_path / "m.csv", thumbs=tmp_path / "t"
            )
        )
        server.close()
        local = open_review(ReviewConfig(cache=rs.cache, root=rs.root, manifest=tmp_path / "m.csv"))
        local.close()
    finally:
        set_reporter(previous)
    assert not server.loopback and local.loopback
    assert [w for w in rep.warnings if "not only this machine" in w] and len(rep.warnings) == 1


def test_ctrl_c_stops_it_and_prints_the_next_commands(tmp_path: Path) -> None:
    rs = make_review_set(tmp_path, audit=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "resnet_transfer", "review", "--cache", str(rs.cache), "--root", str(rs.root)]
    cmd += ["--thumbs", str(tmp_path / "t")]
    before = set(tmp_path.rglob("*"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = proc.stdout.readline().strip() if proc.stdout else ""
    assert url.startswith("http://127.0.0.1:") and "/?token=" in url
    import httpx

    with httpx.Client(follow_redirects=True, timeout=10) as c:
        c.get(url)
        base = url.split("/?")[0]
        r = c.post(base + "/api/label", json={"row": 0, "label": "dog"}, headers={"X-RT-Token": url.split("=")[-1]})
        assert r.status_code == 200
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "1 change(s) in" in err and "rt extract --data" in err and "rt fit-head" in err
    assert (rs.root / "review.csv").read_text().splitlines()[1] == f"{rs.paths[0]},dog"
    # the manifest and its journal are all it wrote (besides the thumbnail folder it was given)
    written = {p for p in tmp_path.rglob("*") if p not in before and tmp_path / "t" not in (p, *p.parents)}
    assert written == {rs.root / "review.csv", rs.root / "review.csv.journal"}
