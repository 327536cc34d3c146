"""`rt review`: open a cache (and its head, audit, test cache, manifest), bind a local port, serve the page.

:func:`open_review` does everything up to the listening socket and returns a :class:`ReviewServer` whose
``url`` (with the token) is what the CLI prints; :meth:`ReviewServer.run` serves until Ctrl-C. The server
binds 127.0.0.1 unless ``host`` says otherwise (a warning then: the token is all that guards it).
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...base import RtError, UsageError, get_reporter
from .thumbs import ThumbCache

EXTRA_HINT = "pip install 'resnet_transfer[review]'"
DEFAULT_MANIFEST = "review.csv"


class MissingExtra(RtError):
    """Starlette or uvicorn is not installed."""


@dataclass
class ReviewConfig:
    cache: Path
    head: Path | None = None
    audit: Path | None = None
    test: Path | None = None
    manifest: Path | None = None  # default: review.csv in the folder the images are in
    root: Path | None = None  # the folder the cache's paths are relative to (default: sheets.image_root)
    test_root: Path | None = None
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    thumbs: Path | None = None  # thumbnail folder (default: thumbs.default_folder())
    uncertain: float = 0.6  # the head's top probability under which a row is "uncertain"


def require_extra() -> None:
    """Starlette and uvicorn, or a :class:`MissingExtra` saying how to get them."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise MissingExtra(f"`rt review` needs the web server packages ({exc.name} is missing)", EXTRA_HINT) from None


def _images(cache: Any, root: Path | None, prefix: str, option: str) -> Any:
    from ...images import image_root
    from .files import ImageFiles
    from .state import Images

    found = image_root(cache, root)  # the one answer to where a cache's images are (images.sheets)
    where = option if root is not None else (found.how if found.found else found.where())
    images = Images(ImageFiles(found.folder, cache.paths, found.reader), prefix, where)
    images.check()
    return images


def build_state(cfg: ReviewConfig) -> Any:
    """The :class:`ReviewState` of ``cfg`` (opens the cache, reads head, audit, test cache and manifest)."""
    import numpy as np

    from ...cache import FeatureCache
    from .commands import extract_options
    from .findings import collect, read_audit
    from .manifest import ReviewManifest
    from .state import ReviewState
    from .vectors import Vectors

    if not 0.0 < cfg.uncertain <= 1.0:
        raise UsageError(f"--uncertain {cfg.uncertain} must be in (0, 1]", "e.g. --uncertain 0.6")
    cache = FeatureCache(cfg.cache)
    images = _images(cache, cfg.root, "train", "--root")
    test_images, test_keys, test_paths = None, None, None
    if cfg.test is not None:
        with FeatureCache(cfg.test) as test:
            test.check_identity(cache.identity, f"the cache {cfg.cache}")
            test_images = _images(test, cfg.test_root, "test", "--test-root")
            test_keys, test_paths = list(test.keys), list(test.paths)
    audit = read_audit(cfg.audit) if cfg.audit is not None else None
    findings = collect(
        cache.paths, cache.keys, audit, test_keys, test_paths, str(cfg.audit) if cfg.audit is not None else None
    )
    vectors = Vectors(cache, cfg.head)
    classes = list(cache.classes)
    if vectors.head is not None:
        classes += [c for c in vectors.head.classes if c not in classes]
    labels = [classes[y] if y >= 0 else None for y in cache.labels]
    root = images.files.root
    path = Path(cfg.manifest) if cfg.manifest is not None else _default_manifest(cfg, root)
    manifest = ReviewManifest(path, root if root is not None else Path(cfg.cache).parent, cache.paths, labels)
    notes = []
    if images.sampled and not images.found:
        notes.append(
            f"no images found: looked in {root if root is not None else '(no folder known)'} ({images.where}); "
            "pass --root DIR (the --data folder the cache was extracted from)"
        )
    if images.files.reader is not None:
        notes.append(
            f"the images are members of {root} ({images.files.reader.kind}): they are shown from it, but "
            "`rt extract --data` cannot read a manifest naming them yet; fix labels in the source itself"
        )
    return ReviewState(
        name=str(cfg.cache),
        paths=list(cache.paths),
        classes=classes,
        given=np.asarray(cache.labels, dtype=np.int64),
        manifest=manifest,
        images=images,
        vectors=vectors,
        findings=findings,
        uncertain=cfg.uncertain,
        test_images=test_images,
        extract_options=extract_options(cache),
        notes=notes,
    )


def _default_manifest(cfg: ReviewConfig, root: Path | None) -> Path:
    """review.csv beside the images (its paths are then the cache's own, and `rt extract`'s change line says
    "relabelled"); beside the cache when the images' folder is not known."""
    if root is not None and Path(root).is_dir():
        return Path(root) / DEFAULT_MANIFEST
    return Path(cfg.cache).with_suffix(".review.csv")


def allowed_hosts(host: str, port: int) -> set[str]:
    """``Host`` header values a request to this server may carry (port included)."""
    names = {host}
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None and ip.is_loopback:
        names |= {"localhost", "127.0.0.1", "[::1]"}
    if ip is not None and ip.is_unspecified:  # every address of this machine
        names |= {"localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn()}
        with contextlib.suppress(OSError):
            names |= {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None)}
    out = set()
    for n in names:
        if n:
            out.add(f"[{n}]:{port}" if ":" in n and not n.startswith("[") else f"{n}:{port}")
    return {h.lower() for h in out}


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UsageError(f"--host {host}: not an address of this machine ({exc})", "use 127.0.0.1 (default)") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise UsageError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc})", "give another --port (0: any free one)"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class ReviewServer:
    """A bound, not yet serving review: ``url`` carries the token."""

    def __init__(self, cfg: ReviewConfig, state: Any) -> None:
        from .server import create_app

        self.cfg = cfg
        self.state = state
        self.token = secrets.token_urlsafe(24)
        self.sock = _bind(cfg.host, cfg.port)
        bound = self.sock.getsockname()
        self.host, self.port = str(bound[0]), int(bound[1])
        shown = cfg.host if cfg.host not in ("0.0.0.0", "::", "") else socket.gethostname()
        self.hosts = allowed_hosts(self.host, self.port) | allowed_hosts(cfg.host, self.port)
        url_host = f"[{shown}]" if ":" in shown else shown
        self.url = f"http://{url_host}:{self.port}/?token={self.token}"
        self.thumbs = ThumbCache(cfg.thumbs)
        self.app = create_app(state, self.token, self.hosts, self.thumbs, cookie=f"rt_review_{self.port}")
        self._server: Any = None

    @property
    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def run(self) -> None:
        """Serve until Ctrl-C (or :meth:`stop`), then release the manifest. Ctrl-C is how a review ends: it
        returns normally (every change is on disk already)."""
        import uvicorn

        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            proxy_headers=False,
            server_header=False,
            ws="none",
        )
        self._server = uvicorn.Server(config)
        try:
            with contextlib.suppress(KeyboardInterrupt):  # uvicorn shuts down on SIGINT, then raises it again
                self._server.run(sockets=[self.sock])
        finally:
            self.close()

    def stop(self) -> None:
        """Ask a running server to finish (from another thread)."""
        if self._server is not None:
            self._server.should_exit = True

    def close(self) -> None:
        self.state.manifest.close()
        self.state.vectors.cache.close()
        self.sock.close()


def open_review(cfg: ReviewConfig) -> ReviewServer:
    """Everything `rt review` does before serving: check the extra, read the inputs, bind the port, warn when
    the bind is not loopback. Returns the server (its ``url`` is the one to open)."""
    require_extra()
    state = build_state(cfg)
    server = ReviewServer(cfg, state)
    rep = get_reporter()
    if not server.loopback:
        rep.warn(
            f"listening on {cfg.host}:{server.port}, not only this machine: anyone who can reach it and has the "
            "token can see the images and change the labels (leave --host out to bind 127.0.0.1)"
        )
    for note in state.info()["notes"]:
        rep.warn(note)
    return server
