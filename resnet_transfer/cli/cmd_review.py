"""`rt review`: the command (parse, build the config, open the server, print its address, serve)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import common


def review(
    cache: Annotated[Path, typer.Option("--cache", "-c", help="The cache whose images to look at (from rt extract).")],
    head: Annotated[
        Path | None,
        typer.Option(
            "--head", help="A head fitted on this cache's features (rt fit-head): its verdicts and probabilities."
        ),
    ] = None,
    audit: Annotated[
        Path | None, typer.Option("--audit", help="The --out folder (or audit.json) of `rt audit` on this cache.")
    ] = None,
    test: Annotated[
        Path | None, typer.Option("--test", help="The test cache: images also in it are marked as leaks.")
    ] = None,
    manifest: Annotated[
        Path | None,
        typer.Option(
            "--manifest",
            "-m",
            help="The path,label CSV every change is written to (default: review.csv in the images' folder).",
        ),
    ] = None,
    root: Annotated[
        Path | None,
        typer.Option("--root", help="Folder the cache's paths are relative to (default: the root it recorded)."),
    ] = None,
    test_root: Annotated[
        Path | None, typer.Option("--test-root", help="Folder --test's paths are relative to.")
    ] = None,
    port: Annotated[int, typer.Option("--port", "-p", help="Port to listen on (0: a free one).")] = 0,
    host: Annotated[
        str,
        typer.Option("--host", help="Address to listen on. Anything but 127.0.0.1 opens the page to the network."),
    ] = "127.0.0.1",
    open_browser: Annotated[bool, typer.Option("--open", help="Open the page in the default browser.")] = False,
    thumbs: Annotated[
        Path | None,
        typer.Option("--thumbs", help="Thumbnail folder (default: ~/.cache/resnet_transfer/thumbs; safe to delete)."),
    ] = None,
    uncertain: Annotated[
        float, typer.Option("--uncertain", help="The head's top probability under which an image is 'uncertain'.")
    ] = 0.6,
) -> None:
    """Look at a cache's images in a local web page and fix their labels: the grid filtered by class, by
    `rt audit`'s findings (label error, duplicate, leak, outlier), by the head's verdict (wrong, uncertain;
    sorted by loss or confidence) or by unlabelled; a side panel with the image large, the head's
    probabilities and the nearest images in the cache. Prints the page's address (with its token).

    Every change is written at once to the manifest (path,label; excluded images left out). Then
    `rt extract --data MANIFEST --out CACHE` brings the cache up to date (relabelled and excluded images
    cost no forward pass) and `rt fit-head` refits.

    Keys: arrows move, 1-9 set the class, 0 unlabelled, x excludes (again: includes), u undoes,
    [ ] or PageUp/PageDown change the page, o opens the original file, ? shows the keys.

    Examples:

        rt review --cache pets.h5 --head pets-head/ --audit audit/ --open

        rt review --cache pets.h5 --manifest fixes.csv --root ./pets

        rt extract --data pets/review.csv --out pets.h5 && rt fit-head --cache pets.h5 --out pets-head/ --overwrite

    The server listens on 127.0.0.1 only and answers only requests carrying the printed token; it writes
    the manifest (and its journal, MANIFEST.journal: the undo history) and thumbnails, nothing else.
    """
    options = dict(locals())
    import webbrowser

    from ..tools import ReviewConfig, open_review

    cfg = common.build(ReviewConfig, options, cli_only=("open_browser",))
    server = common.call(open_review, cfg)
    state = server.state
    typer.echo(server.url)
    typer.echo(
        f"rt review: {len(state.paths)} images of {cache}; changes go to {state.manifest.path}; Ctrl-C stops",
        err=True,
    )
    if open_browser:
        webbrowser.open(server.url)
    common.call(server.run)
    m = state.manifest
    if m.pending:
        typer.echo(f"{m.pending} change(s) in {m.path}; next:", err=True)
        for line in state.commands():
            typer.echo(f"  {line}", err=True)
