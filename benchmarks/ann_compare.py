"""Recall@k and speed of approximate-neighbour libraries against exact search on mean-centred, unit-length
features: how `head/neighbors.py`'s index (faiss HNSW on a PCA, candidates re-ranked) was chosen over
usearch and hnswlib at equal settings (docs/performance.md, "The cache tools at 10k-100k rows").

``python benchmarks/ann_compare.py '{"lib": "faiss_hnsw", "cfg": {"pca": 128, "kf": 2, "M": 32, "efc": 40,
"ef": 64}, "path": "feats.npy", "n": 30000, "nq": 300}'`` prints one JSON line (build, query and total
seconds, recall@20 on ``nq`` sampled queries, peak RSS, load). ``path`` is an ``(N, D)`` float16 ``.npy``:
the features of a planted cache (``tests/planted.py``: ``FeatureCache(...).features()`` saved with
``np.save``) or real ones. ``lib``: faiss_hnsw, faiss_hnsw_sq, faiss_factory, faiss_ivf, usearch, hnswlib,
pynndescent, exact; ``cfg``: pca (components), kf (candidates per neighbour re-ranked), M, efc, ef.
A measuring script, not part of ``python -m benchmarks``: it needs the libraries installed by hand.
"""

import json
import os
import resource
import sys
import time

import numpy as np


def exact_sample(X, q, k):
    S = X[q] @ X.T
    S[np.arange(len(q)), q] = -np.inf
    return np.argsort(-S, 1)[:, :k]


def recall(found, truth):
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def run(lib, cfg, path, n, k, nq):
    X16 = np.load(path, mmap_mode="r")[:n]
    X = np.asarray(X16, dtype=np.float32)
    X -= X.mean(0)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    rng = np.random.default_rng(0)
    q = np.sort(rng.choice(n, nq, replace=False))
    truth = exact_sample(X, q, k)
    t0 = time.perf_counter()
    Xfull = X
    r = cfg.get("pca")
    if r:
        m = min(n, cfg.get("pca_rows", 20000))
        S = X[rng.choice(n, m, replace=False)] if m < n else X
        _w, V = np.linalg.eigh(S.T @ S)
        V = np.ascontiguousarray(V[:, ::-1][:, :r])
        X = X @ V
        tp = time.perf_counter()
    kq = k
    if cfg.get("kf"):
        k = cfg["kf"] * kq
    if lib == "faiss_hnsw":
        import faiss

        faiss.omp_set_num_threads(2)
        idx = faiss.IndexHNSWFlat(X.shape[1], cfg.get("M", 32), faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = cfg.get("efc", 40)
        idx.add(X)
        tb = time.perf_counter()
        idx.hnsw.efSearch = cfg.get("ef", 64)
        _dist, nbr = idx.search(X, k + 1)
    elif lib == "faiss_hnsw_sq":
        import faiss

        faiss.omp_set_num_threads(2)
        idx = faiss.IndexHNSWSQ(X.shape[1], faiss.ScalarQuantizer.QT_fp16, cfg.get("M", 32), faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = cfg.get("efc", 40)
        idx.train(X[:1000])
        idx.add(X)
        tb = time.perf_counter()
        idx.hnsw.efSearch = cfg.get("ef", 64)
        _dist, nbr = idx.search(X, k + 1)
    elif lib == "faiss_factory":
        import faiss

        faiss.omp_set_num_threads(2)
        idx = faiss.index_factory(X.shape[1], cfg["spec"], faiss.METRIC_INNER_PRODUCT)
        idx.train(X[rng.choice(n, min(n, cfg.get("train", 20000)), replace=False)])
        idx.add(X)
        tb = time.perf_counter()
        hn = faiss.extract_index_ivf(idx) if "IVF" in cfg["spec"] else None
        if hn is not None:
            hn.nprobe = cfg.get("nprobe", 16)
        if "HNSW" in cfg["spec"]:
            base = faiss.downcast_index(idx.base_index) if "Refine" in cfg["spec"] else idx
            inner = faiss.downcast_index(base.index) if hasattr(base, "index") and not hasattr(base, "hnsw") else base
            faiss.downcast_index(inner).hnsw.efSearch = cfg.get("ef", 64)
        if "Refine" in cfg["spec"]:
            faiss.downcast_index(idx).k_factor = cfg.get("kf", 2)
        _dist, nbr = idx.search(X, k + 1)
    elif lib == "faiss_ivf":
        import faiss

        faiss.omp_set_num_threads(2)
        nlist = cfg.get("nlist") or int(4 * np.sqrt(n))
        quant = faiss.IndexFlatIP(X.shape[1])
        idx = faiss.IndexIVFFlat(quant, X.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        idx.train(X[rng.choice(n, min(n, 40 * nlist), replace=False)])
        idx.add(X)
        tb = time.perf_counter()
        idx.nprobe = cfg.get("nprobe", 16)
        _dist, nbr = idx.search(X, k + 1)
    elif lib == "usearch":
        from usearch.index import Index

        idx = Index(
            ndim=X.shape[1],
            metric="ip",
            dtype=cfg.get("dtype", "f16"),
            connectivity=cfg.get("M", 16),
            expansion_add=cfg.get("efc", 128),
            expansion_search=cfg.get("ef", 64),
        )
        idx.add(np.arange(n), X, threads=2)
        tb = time.perf_counter()
        m = idx.search(X, k + 1, threads=2)
        nbr = m.keys.astype(np.int64)
    elif lib == "hnswlib":
        import hnswlib

        idx = hnswlib.Index(space="ip", dim=X.shape[1])
        idx.init_index(max_elements=n, M=cfg.get("M", 16), ef_construction=cfg.get("efc", 100))
        idx.set_num_threads(2)
        idx.add_items(X, np.arange(n))
        tb = time.perf_counter()
        idx.set_ef(cfg.get("ef", 64))
        nbr, _dist = idx.knn_query(X, k=k + 1)
        nbr = nbr.astype(np.int64)
    elif lib == "pynndescent":
        import numba

        numba.set_num_threads(2)
        from pynndescent import NNDescent

        idx = NNDescent(X, metric="dot", n_neighbors=cfg.get("nn", 30), random_state=0, n_jobs=2, compressed=False)
        tb = time.perf_counter()
        nbr, _dist = idx.neighbor_graph
        nbr = nbr[:, : k + 1]
    elif lib == "exact":
        tb = t0
        nbr = np.empty((n, k + 1), np.int64)
        for lo in range(0, n, 2048):
            S = X[lo : lo + 2048] @ X.T
            p = np.argpartition(-S, k + 1, axis=1)[:, : k + 1]
            nbr[lo : lo + 2048] = p
    if cfg.get("kf"):
        nbr2 = np.empty((n, kq + 1), np.int64)
        for lo in range(0, n, 1024):
            C = nbr[lo : lo + 1024]
            sims = np.einsum("bd,bkd->bk", Xfull[lo : lo + 1024], Xfull[C])
            o = np.argsort(-sims, 1)[:, : kq + 1]
            nbr2[lo : lo + 1024] = np.take_along_axis(C, o, 1)
        nbr = nbr2
        k = kq
    tq = time.perf_counter()
    found = [[j for j in row if j != i][:k] for i, row in zip(q, nbr[q])]
    return {
        "lib": lib,
        "cfg": cfg,
        "n": n,
        "pca_s": round(tp - t0, 2) if r else 0,
        "build_s": round(tb - t0, 2),
        "query_s": round(tq - tb, 2),
        "total_s": round(tq - t0, 2),
        "recall": round(recall(found, truth), 4),
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load": os.getloadavg()[0],
    }


if __name__ == "__main__":
    a = json.loads(sys.argv[1])
    print(json.dumps(run(a["lib"], a.get("cfg", {}), a["path"], a["n"], a.get("k", 20), a.get("nq", 500))))
