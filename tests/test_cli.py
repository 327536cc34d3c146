from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from resnet_transfer.cli import app

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
