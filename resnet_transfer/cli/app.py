"""The `rt` application: the root group, its global options, the commands and the console entry point.

Start-up stays cheap: the command modules import typer and nothing heavy; torch, timm, scikit-learn and
matplotlib are imported by the library calls that need them (`rt --help`, `--version` and `rt info` never load
torch). Exit codes: 0 success; 2 an error you can fix (message says how); 3 finished but some images were
skipped; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from ..base import tune_process
from . import cmd_extract, cmd_finetune, cmd_head, cmd_review, cmd_tools, common


class _Group(TyperGroup):
    """The root command group: Ctrl-C anywhere in a command (inside a library call or not) exits 130."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None


app = typer.Typer(
    name="rt",
    cls=_Group,
    help=(
        "Transfer learning with pretrained ResNets.\n\n"
        "The small-data workflow: `rt extract` runs the frozen backbone once and caches its features; "
        "`rt fit-head` trains a softmax head on the cache in seconds; `rt finetune` unfreezes more layers "
        "when you have more data; `rt predict` / `rt evaluate` use the result on new images."
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        from ..base.version import __version__

        typer.echo(f"rt (resnet_transfer) {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    common.STATE["debug"] = debug
    common.STATE["quiet"] = quiet


app.command()(cmd_extract.extract)
app.command()(cmd_extract.info)
app.command("fit-head")(cmd_head.fit_head_cmd)
app.command()(cmd_head.predict)
app.command()(cmd_head.evaluate)
app.command()(cmd_finetune.finetune)
app.command()(cmd_finetune.export)
app.command()(cmd_tools.suggest)
app.command()(cmd_tools.audit)
app.command()(cmd_tools.curve)
app.command()(cmd_tools.compare)
app.command()(cmd_review.review)


def main() -> None:
    """Console entry point (`rt`)."""
    tune_process()
    try:
        app(prog_name="rt")
    except SystemExit as exc:
        _exit(exc.code)
    except BaseException:
        if "--debug" in sys.argv:
            raise
        import traceback

        typer.echo(
            "internal error (a bug in rt; please report it with the command you ran):\n"
            + "".join(traceback.format_exc().splitlines(keepends=True)[-3:]),
            err=True,
        )
        raise SystemExit(1) from None


def _exit(code: Any) -> None:
    """Leave the process without the interpreter's teardown of every module: with torch, dynamo and timm
    loaded that takes ~1 s after the work is done (measured on a 2-vCPU Xeon, docs/performance.md). The exit
    handlers (temporary directories, multiprocessing, logging) run first and the streams are flushed; a
    torchrun rank, or ``RT_SLOW_EXIT=1``, exits the ordinary way."""
    import atexit
    import contextlib
    import os

    if os.environ.get("RT_SLOW_EXIT") or "torch" not in sys.modules or "LOCAL_RANK" in os.environ:
        raise SystemExit(code)
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code or 0)
