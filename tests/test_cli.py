from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from resnet_transfer.base import Reporter
from resnet_transfer.cli import app
from tests.conftest import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_help_lists_the_workflow() -> None:
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for command in ("extract", "info"):
        assert command in r.output


def test_extract_help_teaches_with_examples() -> None:
    r = runner.invoke(app, ["extract", "--help"])
    assert r.exit_code == 0
    assert "--cut" in r.output and "rt extract --data" in r.output


def test_cli_import_does_not_load_torch() -> None:
    """`rt --help` and argument errors must answer at once: torch/timm are imported inside commands."""
    code = "import sys, resnet_transfer.cli; print('torch' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_info_on_missing_path() -> None:
    r = runner.invoke(app, ["info", "/nonexistent/cache.h5"])
    assert r.exit_code == 2 and r.output.startswith("error:")


# ------------------------------------------------------------------ shared tiny run (extract + fit-head)

LONG_CLASS = "a_class_name_much_longer_than_twenty_characters"
DEEP = "a folder with a rather long name/and another one below it, also long"
TINY = ("--model", "resnet18", "--weights", "none", "--image-size", "32")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/data`` (3 classes, one deep long-named folder, one unreadable file), ``root/tiny.h5`` and
    ``root/head``; commands run from ``root`` with relative paths."""
    root = tmp_path_factory.mktemp("cli")
    data = make_image_folder(root / "data", per_class=3, seed=4, classes=("circle", "square", LONG_CLASS))
    deep = data / "circle" / DEEP
    deep.mkdir(parents=True)
    (data / "circle" / "circle_4_000.jpg").rename(deep / "the image with the longest name of them all.jpg")
    (data / "square" / "broken.png").write_bytes(b"not a png")
    with _chdir(root):
        r = runner.invoke(app, ["extract", "--data", "data", "--out", "tiny.h5", *TINY])
        assert r.exit_code == 3, r.output  # the broken file
        r = runner.invoke(app, ["fit-head", "--cache", "tiny.h5", "--out", "head"])
        assert r.exit_code == 0, r.output
    return root


@contextlib.contextmanager
def _chdir(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def test_predict_table_shows_paths_as_given_and_whole(tiny_run: Path) -> None:
    with _chdir(tiny_run):
        r = runner.invoke(app, ["predict", "head", "data", "data/circle/circle_4_001.png"])
    assert r.exit_code == 3, r.output  # data/square/broken.png is skipped
    rows = [line for line in r.output.splitlines() if line.startswith("data/")]
    deep = f"data/circle/{DEEP}/the image with the longest name of them all.jpg"
    assert any(line.startswith(deep + "  ") for line in rows), r.output
    assert any(line.startswith("data/circle/circle_4_001.png  ") for line in rows)
    assert len(rows) == 3 * 3 + 1  # every readable image of the folder, plus the file given on its own
    assert "…" not in r.output and str(tiny_run) not in r.output
    assert "data/square/broken.png" in r.output  # skipped, listed as given


def test_predict_json_and_csv_paths_as_given(tiny_run: Path) -> None:
    with _chdir(tiny_run):
        r = runner.invoke(app, ["predict", "head", "data/circle/circle_4_001.png", "--json"])
        c = runner.invoke(app, ["predict", "head", "data/circle/circle_4_001.png", "--csv"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["predictions"][0]["path"] == "data/circle/circle_4_001.png"
    assert c.stdout.splitlines()[1].startswith("data/circle/circle_4_001.png,")


def test_evaluate_prints_class_names_whole(tiny_run: Path) -> None:
    with _chdir(tiny_run):
        r = runner.invoke(app, ["evaluate", "head", "--cache", "tiny.h5"])
    assert r.exit_code == 0, r.output
    confusion = r.output.split("confusion matrix")[1]
    assert LONG_CLASS in confusion and LONG_CLASS in r.output.split("confusion matrix")[0]
    assert "…" not in r.output


def test_info_skipped_lists_whole_paths(tiny_run: Path) -> None:
    with _chdir(tiny_run):
        r = runner.invoke(app, ["info", "tiny.h5", "--skipped"])
    assert r.exit_code == 0, r.output
    assert "square/broken.png: " in r.output and "…" not in r.output


def test_logs_get_whole_lines_and_progress_lines(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RT_PROGRESS_INTERVAL", "0")
    with _chdir(tiny_run):
        r = runner.invoke(app, ["extract", "--data", "data", "--out", "again.h5", "--batch-size", "2", *TINY])
    assert r.exit_code == 3, r.output
    lines = r.output.splitlines()
    start = [line for line in lines if line.startswith("extracting ")]
    assert len(start) == 1 and start[0].endswith("decode threads") and len(start[0]) > 80  # one line, not wrapped
    progress = [line for line in lines if re.match(r"extract: \d+/10 img \(\d+%\), [\d.]+ img/s, ETA \d+s$", line)]
    assert len(progress) == 5 and progress[-1].startswith("extract: 10/10 img (100%)")  # 5 batches of 2


def test_reporter_writes_plain_unwrapped_lines_and_periodic_progress() -> None:
    stream = io.StringIO()
    rep = Reporter(verbose=True, stream=stream, progress_interval=0)
    rep.info("x" * 200)
    rep.table("t", ["image", "#1"], [["p/" * 60 + "a.png", "cat 0.9"]])
    with rep.progress("work", total=4, unit="img") as bar:
        for _ in range(4):
            bar.advance(1)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "x" * 200
    assert lines[3] == "p/" * 60 + "a.png  cat 0.9"
    assert [line.split(" (")[0] for line in lines[4:8]] == [f"work: {i}/4 img" for i in range(1, 5)]
    quiet = io.StringIO()
    slow = Reporter(verbose=True, stream=quiet, progress_interval=3600)
    with slow.progress("work", total=4) as bar:
        bar.advance(4)
    assert quiet.getvalue().count("\n") == 1  # only the final summary within the interval


@pytest.mark.parametrize(
    ("target", "args"),
    [
        ("resnet_transfer.models.info.describe", ["info", "x.h5"]),
        ("resnet_transfer.head.fitting.fit_head", ["fit-head", "--cache", "x.h5"]),
        ("resnet_transfer.models.prediction.predict", ["predict", "head", "x.png"]),
        ("resnet_transfer.models.prediction.evaluate", ["evaluate", "head", "--cache", "x.h5"]),
        ("resnet_transfer.finetuning.training.finetune", ["finetune", "--data", "x"]),
        ("resnet_transfer.models.exporting.export", ["export", "head"]),
        ("resnet_transfer.cli.common.call", ["info", "x.h5"]),  # outside any library call
    ],
)
def test_ctrl_c_exits_130(target: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(target, interrupt)
    r = runner.invoke(app, args)
    assert r.exit_code == 130, r.output


def test_ctrl_c_during_extract_exits_130_and_keeps_chunks(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import resnet_transfer.backbone.forward as forward_mod

    real = forward_mod.forward_images

    def batches(*a: object, **k: object) -> Iterator[object]:  # one batch, then Ctrl-C
        it = iter(real(*a, **k))
        yield next(it)
        raise KeyboardInterrupt

    monkeypatch.setattr(forward_mod, "forward_images", batches)
    out = tmp_path / "c.h5"
    r = runner.invoke(
        app, ["extract", "--data", str(tiny_run / "data"), "--out", str(out), "-b", "2", "--chunk-rows", "2", *TINY]
    )
    assert r.exit_code == 130, r.output
    assert "run the same command again" in r.output


def test_version_and_shell_completion(monkeypatch: pytest.MonkeyPatch) -> None:
    import typer.completion

    from resnet_transfer import __version__

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"rt (resnet_transfer) {__version__}"
    h = runner.invoke(app, ["--help"])
    assert "--install-completion" in h.output and "--show-completion" in h.output
    # --show-completion is a flag whose shell typer detects from the parent processes: none is found when
    # the suite runs detached (nohup, a CI runner without a shell), so the test names the shell itself
    monkeypatch.setattr(typer.completion, "_get_shell_name", lambda: "bash")
    c = runner.invoke(app, ["--show-completion"])
    assert c.exit_code == 0 and "complete" in c.output and "_RT_COMPLETE" in c.output


HEAVY = ("torch", "timm", "torchvision", "sklearn", "matplotlib")


def _modules_after(args: list[str], cwd: Path | None = None) -> tuple[int, set[str]]:
    """Run ``rt ARGS`` in a fresh interpreter; its exit code and which of HEAVY it imported."""
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom resnet_transfer.cli import app\n"
        "r = CliRunner().invoke(app, sys.argv[1:])\n"
        f"print(r.exit_code, *[m for m in {HEAVY!r} if m in sys.modules])"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, cwd=cwd, env=env
    ).stdout.split()
    return int(out[0]), set(out[1:])


def test_start_up_imports_only_what_each_command_needs(tiny_run: Path) -> None:
    assert _modules_after(["--help"]) == (0, set())
    assert _modules_after(["--version"]) == (0, set())
    assert _modules_after(["info", "tiny.h5"], tiny_run) == (0, set())
    assert _modules_after(["info", "head"], tiny_run) == (0, set())
    code, mods = _modules_after(["evaluate", "head", "--cache", "tiny.h5"], tiny_run)  # no backbone, no plot
    assert code == 0 and not mods & {"timm", "torchvision", "matplotlib"}, mods
    # a wrong --data is answered before any backbone is built
    assert _modules_after(["extract", "--data", "no-such-folder", "--out", "x.h5"], tiny_run) == (2, set())


def test_python_m_version_does_not_import_torch() -> None:
    code = "import runpy, sys; sys.argv = ['rt', '--version']\ntry:\n    runpy.run_module('resnet_transfer', run_name='__main__')\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split()[-1] == "False" and "rt (resnet_transfer)" in out.stdout


# ------------------------------------------------------------------------- commands the docs print


def _rt_calls(line: str) -> Iterator[tuple[str, list[str], bool]]:
    """``(command, --options, starts the line)`` for each ``rt COMMAND ...`` in a line of shell."""
    line = line.split(" #")[0]
    for m in re.finditer(r"(?:^|[\s;(&|])rt\s+([a-z][a-z-]*)((?:\s+[^\s;&|)]+)*)", line):
        options = [t.split("=")[0] for t in m.group(2).split() if t.startswith("--")]
        yield m.group(1), options, line[: m.start(1)].strip() in ("rt", "$ rt")


def _documented_calls() -> list[tuple[str, str, list[str], bool]]:
    found = []
    fence = re.compile(r"^```[a-z]*\n(.*?)^```", re.S | re.M)
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "recipes").glob("*/*.md"))]:
        text = f.read_text(encoding="utf-8")
        spans = fence.findall(text) + re.findall(r"`([^`\n]+)`", fence.sub("", text))
        for span in spans:
            for line in span.replace("\\\n", " ").splitlines():
                found += [(f.name, *call) for call in _rt_calls(line)]
    for f in sorted((ROOT / "recipes").glob("*/*.sh")):
        for line in f.read_text(encoding="utf-8").replace("\\\n", " ").splitlines():
            if not line.lstrip().startswith("#"):
                found += [(f.name, *call) for call in _rt_calls(line.replace('"$RT"', "rt"))]
    return found


def test_every_command_the_docs_and_recipes_print_exists() -> None:
    import typer.main

    group = typer.main.get_command(app)
    calls = _documented_calls()
    assert len(calls) > 50 and any(f == "run.sh" for f, *_ in calls)
    wrong = []
    for where, name, options, starts in calls:
        cmd = group.commands.get(name)  # type: ignore[attr-defined]
        if cmd is None:
            if options or starts:
                wrong.append(f"{where}: rt {name} (no such command)")
            continue
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
        wrong += [f"{where}: rt {name} {o} (no such option)" for o in options if o not in known]
    assert not wrong, wrong
