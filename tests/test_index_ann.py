"""Approximate factories (IVF, HNSW, PQ) against exact search, with explicit tolerances."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from refrain.index import IndexOptions, TrackRecord, open_index

ZDIM = 32
IDENTITY = {"weights_sha256": "ann-test", "zdim": ZDIM}
K = 10


def clustered_tracks(n_tracks: int, seed: int = 0):
    """Tracks as versions of 40 works: segments scattered around their work's centre."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, ZDIM)).astype(np.float32) * 2
    for i in range(n_tracks):
        n = int(rng.integers(8, 17))
        work = i % len(centres)
        vectors = centres[work] + 0.6 * rng.standard_normal((n, ZDIM)).astype(np.float32)
        record = TrackRecord(f"t{i:04d}", work_id=f"w{work}", content_sha256=f"c{i}")
        yield record, vectors, np.arange(n) * 5.0


def queries(n: int, seed: int = 99) -> np.ndarray:
    """Noisy copies of stored segments: realistic queries with clear nearest neighbours."""
    rng = np.random.default_rng(seed)
    base = np.concatenate([v for _, v, _ in clustered_tracks(40)])
    return (
        base[rng.choice(len(base), n, replace=False)] + 0.3 * rng.standard_normal((n, ZDIM))
    ).astype(np.float32)


def exact(index, q: np.ndarray, k: int):
    tracks = [t.track_id for t in index.list_tracks(10_000)[0]]
    ids = np.concatenate([index.segment_ids(t) for t in tracks])
    vectors = np.concatenate([index.get_vectors(t)[0] for t in tracks])
    d = ((q[:, None, :].astype(np.float64) - vectors[None]) ** 2).sum(-1) / ZDIM
    order = np.argsort(d, axis=1)[:, :k]
    return np.take_along_axis(d, order, axis=1), ids[order]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])
    )


def test_ivf_searches_exactly_until_trained_then_within_tolerance(tmp_path):
    path = tmp_path / "ivf"
    q = queries(50)
    opts = IndexOptions(snapshot_every_records=10_000)
    with open_index(path, IDENTITY, "IVF32,Flat", options=opts) as ix:
        tracks = iter(clustered_tracks(160))
        while ix.n_segments < 900:  # min_train is 39 * 32 = 1248
            ix.add_track(*next(tracks))
        assert not ix.stats().ann_trained
        d, ids = ix.search(q, K)
        want_d, want_ids = exact(ix, q, K)
        np.testing.assert_array_equal(ids, want_ids)  # the exact float copy is searched
        for track in tracks:
            ix.add_track(*track)
        stats = ix.stats()
        assert stats.ann_trained and stats.snapshot_seq > 0  # trained at an automatic snapshot
        d, ids = ix.search(q, K)
        want_d, want_ids = exact(ix, q, K)
        assert recall(ids, want_ids) >= 0.95
        np.testing.assert_allclose(d[:, 0], want_d[:, 0], rtol=1e-4)
        victim = ix.segment_info(ids[:1, :1])[0][0, 0]
        gone = ix.segment_ids(victim)
        ix.delete_track(victim)  # IVF removes in place
        _, ids = ix.search(q, K)
        assert not np.isin(ids, gone).any() and ix.stats().tombstones == 0
        before = ix.search(q, K)
    with open_index(path, IDENTITY) as ix:
        assert ix.stats().ann_trained
        after = ix.search(q, K)
        np.testing.assert_array_equal(after[1], before[1])
        np.testing.assert_allclose(after[0], before[0])


def test_hnsw_recall_tombstones_and_compaction(tmp_path):
    path = tmp_path / "hnsw"
    q = queries(50)
    opts = IndexOptions(compact_dead_fraction=0.2)
    with open_index(path, IDENTITY, "HNSW16", options=opts) as ix:
        for track in clustered_tracks(120):
            ix.add_track(*track)
        ix.snapshot()
        _, ids = ix.search(q, K)
        assert recall(ids, exact(ix, q, K)[1]) >= 0.9
        deleted = [f"t{i:04d}" for i in range(0, 120, 3)]
        gone = np.concatenate([ix.segment_ids(t) for t in deleted])
        for tid in deleted:
            ix.delete_track(tid)
        assert ix.stats().tombstones == len(gone)
        _, ids = ix.search(q, K)
        assert not np.isin(ids, gone).any() and (ids >= 0).all()
        assert recall(ids, exact(ix, q, K)[1]) >= 0.9
        before = ix.search(q, K)
    with open_index(path, IDENTITY, options=opts) as ix:  # tombstones survive a reopen
        assert ix.stats().tombstones == len(gone)
        np.testing.assert_array_equal(ix.search(q, K)[1], before[1])
        ix.snapshot()  # 1/3 dead > 0.2: the graph is rebuilt without them
        assert ix.stats().tombstones == 0
        _, ids = ix.search(q, K)
        assert not np.isin(ids, gone).any()
        assert recall(ids, exact(ix, q, K)[1]) >= 0.9
    with open_index(path, IDENTITY) as ix:
        assert ix.stats().tombstones == 0 and len(ix) == 80


def test_pq_candidates_with_exact_rerank_recover_exact_top10(tmp_path):
    q = queries(40)
    with open_index(tmp_path / "pq", IDENTITY, "IVF16,PQ8x4") as ix:
        for track in clustered_tracks(110):
            ix.add_track(*track)
        ix.snapshot()
        assert ix.stats().ann_trained
        _, candidates = ix.search(q, 100)
        _, want_ids = exact(ix, q, K)
        ann_recall = recall(candidates[:, :K], want_ids)
        # exact re-rank of the candidates with the stored float vectors
        owners, _ = ix.segment_info(candidates)
        reranked = []
        for row, (cand, own) in enumerate(zip(candidates, owners, strict=True)):
            scored = []
            for tid in set(own) - {None}:
                vectors, _ = ix.get_vectors(tid)
                seg = ix.segment_ids(tid)
                keep = np.isin(seg, cand)
                d = ((vectors[keep] - q[row]) ** 2).sum(-1) / ZDIM
                scored += zip(d.tolist(), seg[keep].tolist(), strict=True)
            reranked.append([sid for _, sid in sorted(scored)[:K]])
        assert recall(np.array(reranked), want_ids) == pytest.approx(1.0)
        assert ann_recall < 1.0  # the compressed codes alone do lose neighbours


def test_ivf_is_retrained_after_tenfold_growth(tmp_path):
    rng = np.random.default_rng(5)

    def add(ix, i: int, n: int) -> None:
        vectors = rng.standard_normal((n, ZDIM)).astype(np.float32)
        ix.add_track(TrackRecord(f"big{i}"), vectors, np.arange(n) * 5.0)

    with open_index(tmp_path / "ivf", IDENTITY, "IVF4,Flat") as ix:
        add(ix, 0, 1200)  # min_train is 1000: trained right away, on 1200 vectors
        assert ix.stats().ann_trained_on == 1200
        for i in range(1, 9):
            add(ix, i, 1200)
        assert ix.stats().ann_trained_on == 1200  # 9x: not yet
        ix.snapshot()
    with open_index(tmp_path / "ivf", IDENTITY) as ix:
        assert ix.stats().ann_trained_on == 1200  # remembered by the snapshot
        add(ix, 9, 1200)
        ix.snapshot()  # 10x
        assert ix.stats().ann_trained_on == 12000
        q = rng.standard_normal((20, ZDIM)).astype(np.float32)
        assert recall(ix.search(q, K)[1], exact(ix, q, K)[1]) >= 0.9


@pytest.mark.requires_cuda
@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="FAISS sees no GPU")
@pytest.mark.parametrize("factory", ["Flat", "IVF32,Flat"])
def test_gpu_index_matches_exact(tmp_path, factory):
    q = queries(30)
    with open_index(tmp_path / "gpu", IDENTITY, factory) as ix:
        for track in clustered_tracks(160):
            ix.add_track(*track)
        ix.snapshot()
        assert ix.stats().ann_on_gpu
        ix.delete_track("t0001")
        gone = set(ix.segment_info(ix.search(q, K)[1])[0].ravel())
        assert "t0001" not in gone
        assert recall(ix.search(q, K)[1], exact(ix, q, K)[1]) >= 0.95
    with open_index(tmp_path / "gpu", IDENTITY) as ix:
        assert ix.stats().ann_on_gpu and len(ix) == 159


def test_fast_scan_pq_serves_the_exact_track_ranking(tmp_path):
    """The large-catalog setting (IVF + 4-bit fast-scan PQ codes, exact re-ranking from the
    stored vectors) through deletes, replaces and a reopen ranks tracks as an exhaustive
    comparison does."""
    from refrain.search.ranking import QuerySegments, SearchOptions, exhaustive_rank, rank_tracks

    path = tmp_path / "fs"
    tracks = list(clustered_tracks(200))
    with open_index(path, IDENTITY, "IVF16,PQ16x4fs") as ix:
        ix.add_tracks(tracks)
        ix.snapshot()
        assert ix.stats().ann_trained
        _, ids = ix.search(queries(20), K)
        assert recall(ids, exact(ix, queries(20), K)[1]) < 1.0  # the codes are approximate
        for record, _, _ in tracks[:10]:
            ix.delete_track(record.track_id)
        record, vectors, starts = tracks[10]
        ix.replace_track(
            TrackRecord(record.track_id, content_sha256="new"), vectors[::-1] + 1, starts
        )
    with open_index(path, IDENTITY) as ix:
        assert len(ix) == 190
        q = queries(12).reshape(4, 3, ZDIM)
        for vectors in q:
            query = QuerySegments(vectors, np.arange(3) * 5.0, 20.0, 30.0)
            hits = rank_tracks(
                ix, query, SearchOptions(top_k=K, k=256, candidates=40, reduction="min")
            )
            want = exhaustive_rank(ix, query, "min", K)
            assert [h.track.track_id for h in hits] == [t for t, _ in want]
            np.testing.assert_allclose(
                [h.distance for h in hits], [d for _, d in want], rtol=1e-5, atol=1e-6
            )
