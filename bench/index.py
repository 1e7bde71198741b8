"""Segment index benchmark: ingestion, ANN build, latency and recall per FAISS factory.

    python bench/index.py                       # 100k x 128, four factories
    python bench/index.py --n 20000 --factories Flat HNSW32

Data are seeded and clustered like version embeddings: tracks of 50 segments scattered around
the centre of their work. Queries are noisy copies of stored segments. Recall@10 is measured
against exact search (faiss.IndexFlatL2 over the same vectors); "rerank" re-scores the top 100
candidates with the exact vectors from `get_vectors`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from refrain.index import IndexOptions, TrackRecord, open_index

SEGMENTS_PER_TRACK = 50


def make_data(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_tracks = n // SEGMENTS_PER_TRACK
    centres = rng.standard_normal((max(1, n_tracks // 4), d)).astype(np.float32)
    work = np.repeat(rng.integers(0, len(centres), n_tracks), SEGMENTS_PER_TRACK)
    vectors = centres[work] + 0.5 * rng.standard_normal((len(work), d)).astype(np.float32)
    picks = rng.choice(len(vectors), 200, replace=False)
    queries = vectors[picks] + 0.2 * rng.standard_normal((200, d)).astype(np.float32)
    return vectors, queries


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])
    )


def rerank(index, queries: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    owners, _ = index.segment_info(candidates)
    out = np.full((len(queries), k), -1, dtype=np.int64)
    for row, query in enumerate(queries):
        ids, vecs = [], []
        for track_id in set(owners[row]) - {None}:
            v, _ = index.get_vectors(track_id)
            ids.append(index.segment_ids(track_id))
            vecs.append(v)
        ids, vecs = np.concatenate(ids), np.concatenate(vecs)
        keep = np.isin(ids, candidates[row])
        d = ((vecs[keep] - query) ** 2).sum(1)
        best = ids[keep][np.argsort(d)[:k]]
        out[row, : len(best)] = best
    return out


def bench(
    factory: str, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int
) -> dict[str, float | str]:
    d = vectors.shape[1]
    identity = {"weights_sha256": "bench", "zdim": d}
    options = IndexOptions(snapshot_every_records=10**9, snapshot_every_bytes=1 << 40)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "idx"
        with open_index(path, identity, factory, options=options) as index:
            t0 = time.perf_counter()
            for i, start in enumerate(range(0, len(vectors), SEGMENTS_PER_TRACK)):
                chunk = vectors[start : start + SEGMENTS_PER_TRACK]
                index.add_track(
                    TrackRecord(f"t{i:06d}", content_sha256=str(i)),
                    chunk,
                    np.arange(len(chunk)) * 5.0,
                )
            ingest = time.perf_counter() - t0
            t0 = time.perf_counter()
            index.snapshot()  # trains IVF/PQ and persists
            build = time.perf_counter() - t0
            index.search(queries[:5], k)  # warm up
            t0 = time.perf_counter()
            found = np.concatenate([index.search(q[None], k)[1] for q in queries])
            per_query = (time.perf_counter() - t0) / len(queries) * 1e3
            _, candidates = index.search(queries, 100)
            reranked = rerank(index, queries, candidates, k)
            stats = index.stats()
        # segment ids follow insertion order here, so they index `vectors` directly
        return {
            "factory": factory,
            "ingest_s": ingest,
            "build_s": build,
            "ms/query": per_query,
            f"recall@{k}": recall(found, truth),
            "rerank100": recall(reranked, truth),
            "bytes/seg": stats.bytes_on_disk / stats.segments,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="number of segments")
    parser.add_argument("--d", type=int, default=128, help="dimension")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument(
        "--factories", nargs="+", default=["Flat", "IVF1024,Flat", "HNSW32", "IVF1024,PQ16"]
    )
    args = parser.parse_args()
    vectors, queries = make_data(args.n, args.d)
    exact = faiss.IndexFlatL2(args.d)
    exact.add(vectors)
    _, truth = exact.search(queries, args.k)
    print(
        f"{args.n} segments x {args.d}, {len(queries)} queries, faiss {faiss.__version__}, "
        f"{faiss.omp_get_max_threads()} threads"
    )
    header = [
        "factory",
        "ingest_s",
        "build_s",
        "ms/query",
        f"recall@{args.k}",
        "rerank100",
        "bytes/seg",
    ]
    print(" | ".join(f"{h:>13}" for h in header))
    for factory in args.factories:
        row = bench(factory, vectors, queries, truth, args.k)
        print(
            " | ".join(
                f"{row[h]:>13.3f}" if isinstance(row[h], float) else f"{row[h]:>13}" for h in header
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
