"""The review's web app: a Starlette application over one :class:`ReviewState`, behind :class:`Guard`.

Routes (all behind the token and Host checks of :mod:`.guard`):

- ``GET /``: the page (``page.html``, ``app.js``, ``style.css`` under ``/static/``: plain HTML/CSS/JS, no CDN);
- ``GET /api/info``, ``/api/rows?class=&finding=&verdict=&status=&sort=&offset=&limit=``, ``/api/row/N``,
  ``/api/state`` (the counters the page polls, so a second tab or an outside edit shows up);
- ``POST /api/label`` ``{"row": N, "label": "cat" | null}``, ``/api/exclude`` ``{"row": N, "excluded": true}``,
  ``/api/undo``: each written to the manifest before the answer;
- ``GET /train/thumb/{s|l}/PATH``, ``/train/file/PATH`` (and ``/test/...`` for the ``--test`` cache): images the
  cache lists, see :mod:`.files`; anything else is 404.
"""

from __future__ import annotations

import html
import json
import threading
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any

from ...base import RtError
from .guard import Guard
from .state import Images, Query, ReviewState
from .thumbs import SIZES, ThumbCache, ThumbnailError

STATIC = {"app.js": "text/javascript", "style.css": "text/css", "favicon.svg": "image/svg+xml"}
MEDIA = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def create_app(
    state: ReviewState, token: str, hosts: Iterable[str], thumbs: ThumbCache, cookie: str = "rt_review"
) -> Any:
    """The ASGI app serving ``state`` to holders of ``token`` whose requests name one of ``hosts``."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    api = _Api(state, token, thumbs)
    routes = [
        Route("/", api.page),
        Route("/static/{name}", api.static),
        Route("/api/info", api.info),
        Route("/api/state", api.counters),
        Route("/api/rows", api.rows),
        Route("/api/row/{row:int}", api.detail),
        Route("/api/label", api.label, methods=["POST"]),
        Route("/api/exclude", api.exclude, methods=["POST"]),
        Route("/api/undo", api.undo, methods=["POST"]),
        Route("/{src}/thumb/{size}/{path:path}", api.thumb),
        Route("/{src}/file/{path:path}", api.file),
    ]
    return Guard(Starlette(routes=routes), token, hosts, cookie)


class _Api:
    """The endpoints; plain functions, run by Starlette in its thread pool (state calls take milliseconds)."""

    def __init__(self, state: ReviewState, token: str, thumbs: ThumbCache) -> None:
        self.state = state
        self.token = token
        self.thumbs = thumbs
        self.lock = threading.RLock()
        self._page: bytes | None = None

    # ---------------------------------------------------------------------------------- helpers

    def _json(self, obj: Any, status: int = 200) -> Any:
        from starlette.responses import Response

        body = json.dumps(obj, ensure_ascii=False, default=str).encode()
        return Response(body, status, media_type="application/json", headers={"cache-control": "no-store"})

    def _guarded(self, fn: Callable[[], Any]) -> Any:
        try:
            with self.lock:
                return self._json(fn())
        except RtError as exc:
            return self._json({"error": exc.message, "hint": exc.hint}, 400)

    def _not_found(self) -> Any:
        from starlette.responses import PlainTextResponse

        return PlainTextResponse("not found\n", 404)

    # ---------------------------------------------------------------------------------- page

    def page(self, request: Any) -> Any:
        from starlette.responses import Response

        if self._page is None:
            text = _static("page.html").decode()
            text = text.replace("{{TOKEN}}", html.escape(self.token)).replace("{{NAME}}", html.escape(self.state.name))
            self._page = text.encode()
        return Response(self._page, media_type="text/html; charset=utf-8", headers={"cache-control": "no-store"})

    def static(self, request: Any) -> Any:
        from starlette.responses import Response

        name = request.path_params["name"]
        if name not in STATIC:
            return self._not_found()
        return Response(_static(name), media_type=STATIC[name], headers={"cache-control": "no-cache"})

    # ---------------------------------------------------------------------------------- reading

    def info(self, request: Any) -> Any:
        return self._guarded(lambda: (self.state.refresh(), self.state.info())[1])

    def counters(self, request: Any) -> Any:
        return self._guarded(lambda: {"reloaded": self.state.refresh(), **self.state.counters()})

    def rows(self, request: Any) -> Any:
        return self._guarded(lambda: self.state.page(Query.from_params(request.query_params)))

    def detail(self, request: Any) -> Any:
        return self._guarded(lambda: self.state.detail(int(request.path_params["row"])))

    # ---------------------------------------------------------------------------------- changes

    async def _body(self, request: Any) -> dict[str, Any]:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            body = None
        return body if isinstance(body, dict) else {}

    async def label(self, request: Any) -> Any:
        body = await self._body(request)
        label = body.get("label")
        return await _in_thread(
            lambda: self._guarded(
                lambda: self.state.set_label(_row(body), label if isinstance(label, str) and label else None)
            )
        )

    async def exclude(self, request: Any) -> Any:
        body = await self._body(request)
        return await _in_thread(
            lambda: self._guarded(lambda: self.state.set_excluded(_row(body), bool(body.get("excluded", True))))
        )

    async def undo(self, request: Any) -> Any:
        return await _in_thread(lambda: self._guarded(self.state.undo))

    # ---------------------------------------------------------------------------------- images

    def _images(self, src: str) -> Images | None:
        return self.state.images if src == "train" else self.state.test_images if src == "test" else None

    def thumb(self, request: Any) -> Any:
        from starlette.responses import Response

        images = self._images(request.path_params["src"])
        size = SIZES.get(request.path_params["size"])
        file = images.files.servable_path(request.path_params["path"]) if images and size else None
        if file is None:
            return self._not_found()
        try:  # a thumbnail is a few KB: read here, in this request's thread (no extra hops for streaming)
            data = self.thumbs.get(file, size).read_bytes()
        except (ThumbnailError, OSError):
            return self._not_found()
        return Response(data, media_type="image/jpeg", headers={"cache-control": "private, max-age=3600"})

    def file(self, request: Any) -> Any:
        from starlette.responses import FileResponse

        images = self._images(request.path_params["src"])
        file = images.files.servable_path(request.path_params["path"]) if images else None
        if file is None:
            return self._not_found()
        media = MEDIA.get(file.suffix.lower(), "application/octet-stream")
        headers = {"cache-control": "private, max-age=60"}
        if hasattr(file, "reader"):  # a member of an archive, shards or a dataset: its bytes, read here
            from starlette.responses import Response

            try:
                return Response(file.read(), media_type=media, headers=headers)
            except Exception:
                return self._not_found()
        return FileResponse(file, media_type=media, headers=headers)


def _row(body: dict[str, Any]) -> int:
    from ...base import UsageError

    row = body.get("row")
    if not isinstance(row, int) or isinstance(row, bool):
        raise UsageError(f"row={row!r} is not a row number")
    return row


async def _in_thread(fn: Callable[[], Any]) -> Any:
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn)
