"""Nearest neighbours by the cosine of mean-centred features: the package's one neighbour search (the kNN
beside the head, `rt audit`'s near duplicates, leakage and outliers, `rt curve`'s kNN).

Rows are compared as unit vectors of ``x - mean`` (the reference rows' mean unless given: raw ReLU features
are all positive, so their plain cosines crowd near 1). Two paths give one answer, :class:`Neighbours`:

* **exact**: brute force in blocks of ``BLOCK`` query x ``BLOCK`` reference rows (float32 BLAS) with a
  running top-k; memory stays at a few blocks whatever the rows, work grows with query x reference rows.
* **index**: faiss's HNSW graph (the optional ``ann`` extra: ``pip install 'resnet_transfer[ann]'``) over a
  ``PCA_DIM``-component PCA of the unit vectors; each query's ``CANDIDATES * (k + 1)`` candidates are
  re-ranked by their cosine on the full features, so the similarities returned are those of the features
  (to bf16 rounding, ~1e-4). Work ~ rows x log(rows). Its recall@k against exact search is measured on a
  seeded sample of ``RECALL_QUERIES`` queries and reported with the result.

``search="auto"`` is exact while its work (query rows x reference rows x dim multiply-adds) is at most
``EXACT_WORK`` (seconds on two cores) or the reference is small; above that the index when faiss is
installed, else exact with a warning that says how long it may take and how to get the index. Features stay
in the dtype they are stored in (float16 in a cache) until a block is computed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..base import UsageError, get_reporter

SEARCHES = ("auto", "exact", "index")
BLOCK = 4096  # rows per query block and per reference block of the exact search (a 64 MB float32 product)
EXACT_WORK = 1.2e12  # multiply-adds up to which auto keeps exact search (~15 s of float32 BLAS on 2 cores)
EXACT_LIMIT = 5e13  # work above which an optional search (the kNN beside the head) is not run unasked
EXACT_RATE = 8e10  # multiply-adds per second of that BLAS (docs/performance.md), for the time estimate only
INDEX_MIN_ROWS = 5000  # below this many reference rows exact search is always taken
PCA_DIM = 128  # components the index is built on (features with at most this many values are used as is)
PCA_ROWS = 8192  # rows the PCA is fitted on (a seeded sample)
HNSW_M = 32  # graph links per node
EF_CONSTRUCTION = 40
EF_SEARCH = 128  # planted 100k rows: recall@20 0.85 at 64, 0.91 at 128 (+12% time; docs/performance.md)
CANDIDATES = 2  # re-ranked candidates per query: CANDIDATES * (k + 1)
RECALL_QUERIES = 500  # queries whose index neighbours are checked against exact search
RECALL_FLOOR = 0.9  # a measured recall@k below this is warned about
EXTRA_HINT = "pip install 'resnet_transfer[ann]' (faiss-cpu) for the approximate index"


@dataclass
class Neighbours:
    """Per query row its ``k`` nearest reference rows: ``index`` (int64, -1 where the reference has fewer)
    and ``similarity`` (float32 cosine of the mean-centred features, descending), plus ``info``: which path
    ran and why, the index's parameters and measured recall, the seconds taken."""

    index: np.ndarray
    similarity: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def distance(self) -> np.ndarray:
        """Cosine distances (1 - similarity), as scikit-learn's ``metric="cosine"`` gives them."""
        return 1.0 - self.similarity


def feature_mean(X: Any, block: int = BLOCK) -> np.ndarray:
    """The column mean of ``X`` (float32), summed in float64 a block at a time."""
    total = np.zeros(X.shape[1], dtype=np.float64)
    for lo in range(0, len(X), block):
        total += np.asarray(X[lo : lo + block], dtype=np.float64).sum(0)
    return (total / max(len(X), 1)).astype(np.float32)


class Unit:
    """The rows of ``X`` as unit vectors of ``x - mean`` (float32), made a block at a time: ``X`` stays as
    stored. A row equal to the mean becomes the zero vector (cosine 0 with everything)."""

    def __init__(self, X: Any, mean: np.ndarray) -> None:
        self.X = X
        self.mean = np.asarray(mean, dtype=np.float32)
        self.n, self.dim = int(X.shape[0]), int(X.shape[1])

    def rows(self, lo: int, hi: int) -> np.ndarray:
        return self._unit(np.asarray(self.X[lo:hi]))

    def take(self, idx: np.ndarray) -> np.ndarray:
        return self._unit(np.asarray(self.X[np.asarray(idx, dtype=np.int64)]))

    def _unit(self, B: np.ndarray) -> np.ndarray:
        B = B.astype(np.float32)  # a copy: the caller's array is never changed
        B -= self.mean
        return normalise(B)


def normalise(B: np.ndarray) -> np.ndarray:
    """``B``'s rows scaled to unit length in place (zero rows stay zero); returns ``B``."""
    norms = np.sqrt(np.einsum("ij,ij->i", B, B))
    B /= np.maximum(norms, 1e-12)[:, None]
    return B


def index_available() -> bool:
    """Whether faiss (the ``ann`` extra) can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def choose_path(n_query: int, n_ref: int, dim: int, search: str = "auto") -> tuple[str, str]:
    """``("exact" | "index", why)`` for a search of ``n_query`` rows among ``n_ref`` (see the module doc)."""
    if search not in SEARCHES:
        raise UsageError(f"--search {search!r} is not known", f"use one of {', '.join(SEARCHES)}")
    work = float(n_query) * n_ref * dim
    size = f"{n_query:,} x {n_ref:,} rows x {dim:,} features"
    if search == "exact":
        return "exact", f"asked for (--search exact); {size}"
    if search == "index":
        if not index_available():
            raise UsageError("--search index: faiss is not installed", EXTRA_HINT)
        return "index", f"asked for (--search index); {size}"
    if work <= EXACT_WORK or n_ref < INDEX_MIN_ROWS:
        return "exact", f"{size}: exact search is fast enough"
    if index_available():
        return "index", f"{size}: {work:.1e} multiply-adds of exact search, the index is faster"
    minutes = work / EXACT_RATE / 60
    get_reporter().warn(
        f"neighbour search of {size} is exact (faiss is not installed): about {minutes:.0f} min on 2 cores; "
        f"{EXTRA_HINT}"
    )
    return "exact", f"{size}: faiss is not installed ({EXTRA_HINT})"


def search(
    reference: Any,
    queries: Any = None,
    k: int = 10,
    mean: np.ndarray | None = None,
    search: str = "auto",
    seed: int = 0,
    what: str = "neighbours",
    exclude: np.ndarray | None = None,
) -> Neighbours:
    """The ``k`` nearest rows of ``reference`` for every row of ``queries`` by cosine of the mean-centred
    features; ``queries=None``: of every reference row among the others (itself left out). ``exclude[i]``:
    a reference row query ``i`` may not have as a neighbour (itself, for leave-one-out on a sample), -1 for
    none. Arrays may be float16 (as a cache stores them); ``mean`` defaults to the reference's. ``what``
    names the search in the log line."""
    if k < 1:
        raise UsageError(f"k={k}: a neighbour search needs k >= 1")
    t0 = time.perf_counter()
    mean = feature_mean(reference) if mean is None else mean
    ref = Unit(reference, mean)
    qry = ref if queries is None else Unit(queries, mean)
    own = np.arange(qry.n) if queries is None else (None if exclude is None else np.asarray(exclude, np.int64))
    k = min(int(k), ref.n - (1 if own is not None else 0))
    path, why = choose_path(qry.n, ref.n, ref.dim, search) if k > 0 else ("exact", "nothing to search")
    info: dict[str, Any] = {"path": path, "why": why, "k": k, "reference_rows": ref.n, "query_rows": qry.n}
    if k <= 0:
        idx, sim = np.full((qry.n, 0), -1, np.int64), np.zeros((qry.n, 0), np.float32)
    elif path == "exact":
        idx, sim = exact_search(ref, qry, k, own)
    else:
        idx, sim, more = index_search(ref, qry, k, own, seed)
        info.update(more)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    _log(what, info)
    return Neighbours(idx, sim, info)


def too_slow(n_query: int, n_ref: int, dim: int, search: str = "auto") -> str | None:
    """Why a search would take too long to run unasked (auto, no faiss, exact work over ``EXACT_LIMIT``),
    and how to run it; ``None`` when it runs."""
    work = float(n_query) * n_ref * dim
    if search != "auto" or work <= EXACT_LIMIT or index_available():
        return None
    return (
        f"{n_query:,} x {n_ref:,} rows x {dim:,} features would take about {work / EXACT_RATE / 60:.0f} min of "
        f"exact search on 2 cores: {EXTRA_HINT}, or pass --knn-search exact to run it anyway"
    )


def _log(what: str, info: dict[str, Any]) -> None:
    rep = get_reporter()
    line = f"{what}: {info['path']} search, {info['query_rows']:,} x {info['reference_rows']:,} rows, k={info['k']}"
    if info["path"] == "index":
        line += f", recall@{info['k']} {info['recall_at_k']:.3f} on {info['recall_queries']} sampled queries"
    rep.info(f"{line} ({info['seconds']:.1f}s)")
    if info["path"] == "index" and info["recall_at_k"] < RECALL_FLOOR:
        rep.warn(
            f"{what}: the index found {info['recall_at_k']:.0%} of the true neighbours on a sample (features "
            f"with little low-dimensional structure); pass --search exact (or --knn-search exact) for exact ones"
        )


def exact_search(ref: Unit, qry: Unit, k: int, own: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (index, similarity) of every ``qry`` row among ``ref``'s rows, block by block;
    ``own[i]``: the reference row query ``i`` is (left out of its neighbours), or -1."""
    idx = np.empty((qry.n, k), dtype=np.int64)
    sim = np.empty((qry.n, k), dtype=np.float32)
    for q0 in range(0, qry.n, BLOCK):
        q1 = min(qry.n, q0 + BLOCK)
        i, s = _exact_block(ref, qry.rows(q0, q1), k, None if own is None else own[q0:q1])
        idx[q0:q1], sim[q0:q1] = i, s
    return idx, sim


def _exact_block(ref: Unit, Q: np.ndarray, k: int, own: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    best_s = np.zeros((len(Q), 0), dtype=np.float32)
    best_i = np.zeros((len(Q), 0), dtype=np.int64)
    for r0 in range(0, ref.n, BLOCK):
        r1 = min(ref.n, r0 + BLOCK)
        S = Q @ ref.rows(r0, r1).T
        if own is not None:
            hit = np.flatnonzero((own >= r0) & (own < r1))
            S[hit, own[hit] - r0] = -np.inf
        kk = min(k, r1 - r0)
        part = np.argpartition(S, S.shape[1] - kk, axis=1)[:, -kk:]
        best_s = np.concatenate([best_s, np.take_along_axis(S, part, 1)], 1)
        best_i = np.concatenate([best_i, part + r0], 1)
        if best_s.shape[1] > k:
            keep = np.argpartition(best_s, best_s.shape[1] - k, axis=1)[:, -k:]
            best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return sort_neighbours(best_i, best_s)


def sort_neighbours(idx: np.ndarray, sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's neighbours by similarity, highest first (ties: the lower row index first)."""
    order = np.lexsort((idx, -sim), axis=1)
    return np.take_along_axis(idx, order, 1), np.take_along_axis(sim, order, 1)


# ------------------------------------------------------------------------------------------------ index


def index_search(
    ref: Unit, qry: Unit, k: int, own: np.ndarray | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Approximate top-``k`` like :func:`exact_search`, through faiss's HNSW on a PCA of the unit vectors,
    candidates re-ranked on the full features; plus the index's description and its recall@k (and @1)
    against exact search on a seeded sample of queries."""
    import faiss

    from ..base import cpu_cores

    faiss.omp_set_num_threads(cpu_cores())
    rng = np.random.default_rng(seed)
    V = _pca(ref, rng)
    full = _UnitStore(ref)
    index = faiss.IndexHNSWFlat(ref.dim if V is None else V.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EF_CONSTRUCTION
    for lo in range(0, ref.n, BLOCK):
        index.add(_project(ref.rows(lo, min(ref.n, lo + BLOCK)), V))
    kc = min(ref.n, CANDIDATES * (k + 1))
    index.hnsw.efSearch = max(EF_SEARCH, kc)
    idx = np.empty((qry.n, k), dtype=np.int64)
    sim = np.empty((qry.n, k), dtype=np.float32)
    step = REFINE_ROWS
    for q0 in range(0, qry.n, step):
        q1 = min(qry.n, q0 + step)
        Q = qry.rows(q0, q1)
        cand = index.search(_project(Q, V), kc)[1]
        s = full.cosines(Q, cand)
        if own is not None:
            s[cand == own[q0:q1, None]] = -np.inf
        top = np.argpartition(s, kc - k, axis=1)[:, -k:]
        idx[q0:q1], sim[q0:q1] = sort_neighbours(np.take_along_axis(cand, top, 1), np.take_along_axis(s, top, 1))
    sample = np.sort(rng.choice(qry.n, size=min(qry.n, RECALL_QUERIES), replace=False))
    true_idx, _ = exact_search(ref, Unit(qry.X[sample], ref.mean), k, None if own is None else own[sample])
    found = idx[sample]
    info = {
        "library": f"faiss {faiss.__version__}",
        "index": (
            f"HNSW (M={HNSW_M}, efConstruction={EF_CONSTRUCTION}, efSearch={index.hnsw.efSearch}) on "
            + ("the unit vectors" if V is None else f"a {V.shape[1]}-component PCA of the unit vectors")
            + f"; {kc} candidates per query re-ranked by the cosine of the full features"
        ),
        "recall_at_k": _recall(found, true_idx),
        "recall_at_1": _recall(found[:, :1], true_idx[:, :1]),
        "recall_queries": len(sample),
    }
    return idx, sim, info


REFINE_ROWS = 512  # queries re-ranked at a time (their candidates' full rows are gathered into one buffer)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true neighbours that were found."""
    if not truth.size:
        return 1.0
    hits = [len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth)]
    return round(float(np.mean(hits)), 4)


def _pca(ref: Unit, rng: np.random.Generator) -> np.ndarray | None:
    """The top ``PCA_DIM`` principal directions (dim x PCA_DIM) of the unit vectors of a seeded sample of
    ``PCA_ROWS`` rows (scikit-learn's randomized SVD); ``None`` when the features have no more values."""
    from sklearn.utils.extmath import randomized_svd

    if ref.dim <= PCA_DIM:
        return None
    rows = np.sort(rng.choice(ref.n, size=min(ref.n, PCA_ROWS), replace=False))
    _, _, Vt = randomized_svd(ref.take(rows), PCA_DIM, n_iter=4, random_state=int(rng.integers(1 << 31)))
    return np.ascontiguousarray(Vt.T, dtype=np.float32)


def _project(U: np.ndarray, V: np.ndarray | None) -> np.ndarray:
    """Unit rows ``U`` in the PCA's coordinates, normalised again (the index compares their cosines)."""
    if V is None:
        return np.ascontiguousarray(U)
    return normalise(U @ V)


class _UnitStore:
    """All reference rows as unit vectors in one torch tensor (bf16 on CPUs with native bf16, else float32),
    for re-ranking candidates: the cosine of a query with each of its candidates' full rows."""

    def __init__(self, ref: Unit) -> None:
        import torch

        from ..base import cpu_supports_bf16

        self.dtype = torch.bfloat16 if cpu_supports_bf16() else torch.float32
        self.rows = torch.empty((ref.n, ref.dim), dtype=self.dtype)
        for lo in range(0, ref.n, BLOCK):
            hi = min(ref.n, lo + BLOCK)
            self.rows[lo:hi] = torch.from_numpy(ref.rows(lo, hi))
        self.buf = torch.empty(0, dtype=self.dtype)

    def cosines(self, Q: np.ndarray, cand: np.ndarray) -> np.ndarray:
        import torch

        b, kc = cand.shape
        if self.buf.shape[0] < b * kc:
            self.buf = torch.empty((b * kc, self.rows.shape[1]), dtype=self.dtype)
        flat = torch.from_numpy(np.maximum(cand, 0).reshape(-1))
        G = torch.index_select(self.rows, 0, flat, out=self.buf[: b * kc]).view(b, kc, -1)
        q = torch.from_numpy(np.ascontiguousarray(Q)).to(self.dtype).unsqueeze(2)
        s = torch.bmm(G, q).squeeze(2).float().numpy()
        s[cand < 0] = -np.inf
        return s
