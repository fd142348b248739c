"""The reference for benches/serve.rs: faiss-cpu HNSW on the very vectors towerstream's usearch
index is measured on, tuned to the same recall@100, one search thread.

    .venv/bin/python benches/faiss_reference.py VECTORS QUERIES DIM TARGET_RECALL [M EF_CONSTRUCTION]

VECTORS and QUERIES are raw little-endian float32 files (n × dim). Prints one JSON object.
faiss-cpu comes from PyPI: `scripts/bench-deps` installs it into the project venv.
"""

import json
import sys
import time

import faiss
import numpy as np


def main():
    vec_path, q_path, dim, target = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    m = int(sys.argv[5]) if len(sys.argv) > 5 else 16
    ef_construction = int(sys.argv[6]) if len(sys.argv) > 6 else 128
    xb = np.fromfile(vec_path, dtype=np.float32).reshape(-1, dim)
    xq = np.fromfile(q_path, dtype=np.float32).reshape(-1, dim)
    faiss.omp_set_num_threads(1)

    truth_index = faiss.IndexFlatIP(dim)
    truth_index.add(xb)
    _, truth = truth_index.search(xq, 100)

    index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    t0 = time.perf_counter()
    index.add(xb)
    build = time.perf_counter() - t0

    result = None
    for ef in [16, 32, 64, 100, 128, 160, 200, 256, 320, 400, 512, 768, 1024, 1536, 2048]:
        index.hnsw.efSearch = ef
        lat = []
        hits = 0
        for i in range(len(xq)):
            t = time.perf_counter()
            _, ids = index.search(xq[i : i + 1], 100)
            lat.append((time.perf_counter() - t) * 1000.0)
            hits += len(set(ids[0].tolist()) & set(truth[i].tolist()))
        recall = hits / (100 * len(xq))
        lat.sort()
        result = {
            "benchmark": "faiss-cpu HNSW search top-100, 1 thread",
            "faiss": faiss.__version__, "items": len(xb), "M": m, "efConstruction": ef_construction,
            "efSearch": ef, "build_seconds": build, "recall": recall,
            "p50_ms": lat[len(lat) // 2], "p99_ms": lat[int(0.99 * (len(lat) - 1))],
            "queries_per_second": len(lat) / (sum(lat) / 1000.0),
        }
        if recall >= target:
            break
    print(json.dumps(result))


if __name__ == "__main__":
    main()
