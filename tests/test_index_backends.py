"""The index test-suite run over both backends: FAISS (`SegmentIndex`) and Milvus
(`MilvusSegmentIndex` on milvus-lite), plus Milvus against the exact FAISS index."""

from __future__ import annotations

import importlib.util
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from test_index import (
    IDENTITY,
    ZDIM,
    exact_neighbours,
    fill,
    list_all,
    make_track,
    segment_ids_of,
)

from refrain.index import (
    AddResult,
    CorruptIndexError,
    IdentityMismatchError,
    IndexClosedError,
    IndexLockedError,
    TrackExistsError,
    TrackNotFoundError,
    TrackRecord,
    open_index,
)
from refrain.search.ranking import QuerySegments, SearchOptions, exhaustive_rank, rank_tracks

HAVE_MILVUS = all(importlib.util.find_spec(m) for m in ("pymilvus", "milvus_lite"))
needs_milvus = pytest.mark.skipif(
    not HAVE_MILVUS, reason="milvus-lite is not installed (pip install -e '.[milvus]')"
)
BACKENDS = ["faiss", pytest.param("milvus", marks=needs_milvus)]
EXACT = {"faiss": "Flat", "milvus": "FLAT"}


def open_backend(backend: str, path, identity=IDENTITY, factory: str | None = None, **milvus):
    if backend == "faiss":
        return open_index(path, identity, factory)
    from refrain.index.milvus import MilvusOptions, open_milvus_index

    opts = MilvusOptions(index_type=factory or "FLAT", **milvus)
    return open_milvus_index(path, identity, opts)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def index(backend, tmp_path):
    with open_backend(backend, tmp_path / "idx") as ix:
        yield ix


def test_add_get_and_stats(index, backend):
    stored = fill(index, 12)
    assert len(index) == 12
    assert index.n_segments == sum(len(v) for v, _ in stored.values())
    rec = index.get_track("trk-0003")
    assert rec.title == "Song 3" and rec.work_id == "w3" and rec.artist == "Band"
    assert rec.n_segments == len(stored["trk-0003"][0]) and rec.added_at > 0
    assert index.get_track("nope") is None
    for tid, (vectors, starts) in stored.items():
        got_v, got_s = index.get_vectors(tid)
        np.testing.assert_array_equal(got_v, vectors)
        np.testing.assert_array_equal(got_s, starts)
        assert tid in index
    stats = index.stats()
    assert (stats.tracks, stats.segments, stats.factory) == (12, index.n_segments, EXACT[backend])
    assert stats.bytes_on_disk > 0 and stats.seq == 12


def test_list_tracks_pagination_is_stable(index):
    fill(index, 25)
    page1, cursor = index.list_tracks(10)
    assert [t.track_id for t in page1] == [f"trk-{i:04d}" for i in range(10)]
    index.delete_track("trk-0002")
    index.add_track(*make_track(5000, np.random.default_rng(9)))
    rest = []
    while cursor is not None:
        page, cursor = index.list_tracks(10, cursor)
        rest += page
    assert [t.track_id for t in rest] == [f"trk-{i:04d}" for i in range(10, 25)] + ["trk-5000"]
    with pytest.raises(ValueError, match="limit"):
        index.list_tracks(0)


def test_delete_removes_segments_everywhere(index):
    stored = fill(index, 10)
    victim_vectors = stored["trk-0004"][0]
    victim_ids = segment_ids_of(index, "trk-0004", len(victim_vectors))
    assert index.delete_track("trk-0004") is True
    assert index.delete_track("trk-0004") is False
    assert index.get_track("trk-0004") is None and "trk-0004" not in index
    with pytest.raises(TrackNotFoundError):
        index.get_vectors("trk-0004")
    _, ids = index.search(victim_vectors, 5)
    assert not np.isin(ids, victim_ids).any()
    owners, starts = index.segment_info(victim_ids)
    assert all(o is None for o in owners) and np.isnan(starts).all()
    assert len(index) == 9


def test_replace_and_idempotency(index):
    rng = np.random.default_rng(3)
    record, vectors, starts = make_track(1, rng, n=4)
    assert index.add_track(record, vectors, starts) is AddResult.ADDED
    seq = index.stats().seq
    assert index.add_track(record, vectors + 1, starts) is AddResult.UNCHANGED
    assert index.stats().seq == seq
    new_record, new_vectors, new_starts = make_track(1, rng, n=6, version=2)
    with pytest.raises(TrackExistsError, match="replace=True"):
        index.add_track(new_record, new_vectors, new_starts)
    old_ids = segment_ids_of(index, record.track_id, 4)
    assert index.replace_track(new_record, new_vectors, new_starts) is AddResult.REPLACED
    np.testing.assert_array_equal(index.get_vectors(record.track_id)[0], new_vectors)
    assert index.get_track(record.track_id).n_segments == 6
    assert index.n_segments == 6 and len(index) == 1
    assert all(o is None for o in index.segment_info(old_ids)[0])
    other, v, s = make_track(2, rng)
    with pytest.raises(TrackNotFoundError, match="trk-0002"):
        index.replace_track(other, v, s)
    assert index.add_track(other, v, s, replace=True) is AddResult.ADDED


def test_exact_search(index):
    fill(index, 40)
    queries = np.random.default_rng(7).standard_normal((9, ZDIM)).astype(np.float32)
    distances, ids = index.search(queries, 10)
    want_d, want_ids = exact_neighbours(index, queries, 10)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(distances, want_d, rtol=1e-5, atol=1e-6)
    assert distances.shape == ids.shape == (9, 10) and ids.dtype == np.int64
    owners, starts = index.segment_info(ids)
    for row_o, row_s, row_i in zip(owners, starts, ids, strict=True):
        for tid, start, sid in zip(row_o, row_s, row_i, strict=True):
            _, track_starts = index.get_vectors(tid)
            first = index.segment_ids(tid)[0]
            assert start == track_starts[sid - first]


def test_search_pads_missing_neighbours_and_empty_index(index):
    distances, ids = index.search(np.zeros((2, ZDIM), np.float32), 3)
    assert (ids == -1).all() and np.isinf(distances).all()
    record, vectors, starts = make_track(0, np.random.default_rng(1), n=3)
    index.add_track(record, vectors, starts)
    distances, ids = index.search(vectors[:1], 5)
    assert (ids[0, 3:] == -1).all() and np.isinf(distances[0, 3:]).all()
    assert distances[0, 0] == pytest.approx(0, abs=1e-6) and ids[0, 0] >= 0
    owners, starts = index.segment_info(ids)
    assert owners[0, 4] is None and np.isnan(starts[0, 4])


def test_bad_input_is_rejected_and_harmless(index):
    with pytest.raises(ValueError, match=r"shape \(n, 16\), got shape \(3, 17\)"):
        index.add_track(TrackRecord("t"), np.zeros((3, ZDIM + 1)), np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        index.add_track(TrackRecord("t"), np.full((2, ZDIM), np.nan), np.zeros(2))
    with pytest.raises(ValueError, match="track_id"):
        index.add_track(TrackRecord(""), np.zeros((1, ZDIM)), [0.0])
    with pytest.raises(ValueError, match="queries of shape"):
        index.search(np.zeros((2, 3)), 1)
    assert len(index) == 0 and index.stats().seq == 0


def test_reopen_gives_identical_results(tmp_path, backend):
    path = tmp_path / "idx"
    queries = np.random.default_rng(5).standard_normal((6, ZDIM)).astype(np.float32)

    def observe(ix):
        return ix.search(queries, 8), list_all(ix), ix.get_vectors("trk-0002"), len(ix)

    with open_backend(backend, path) as ix:
        fill(ix, 30)
        ix.snapshot()
        rng = np.random.default_rng(11)
        for i in range(30, 36):
            ix.add_track(*make_track(i, rng))
        ix.delete_track("trk-0001")
        ix.replace_track(*make_track(2, rng, version=2))
        before = observe(ix)
    with open_backend(backend, path) as ix:
        after = observe(ix)
    np.testing.assert_array_equal(after[0][1], before[0][1])
    np.testing.assert_allclose(after[0][0], before[0][0], rtol=1e-6)
    assert after[1] == before[1] and after[3] == before[3]
    np.testing.assert_array_equal(after[2][0], before[2][0])


def test_identity_mismatch_is_refused(tmp_path, backend):
    with open_backend(backend, tmp_path / "idx") as ix:
        fill(ix, 2)
    other = dict(IDENTITY, weights_sha256="cd" * 32, hop_s=2.5)
    with pytest.raises(IdentityMismatchError) as err:
        open_backend(backend, tmp_path / "idx", other)
    assert "hop_s: index has 5.0, model has 2.5" in str(err.value)
    with open_backend(backend, tmp_path / "idx") as ix:  # the refusal left it usable
        assert len(ix) == 2


def test_second_writer_is_locked_out(tmp_path, backend):
    ix = open_backend(backend, tmp_path / "idx")
    with pytest.raises(IndexLockedError, match="already open for writing by process"):
        open_backend(backend, tmp_path / "idx")
    ix.close()
    ix.close()
    with pytest.raises(IndexClosedError):
        ix.search(np.zeros((1, ZDIM)), 1)


def test_search_concurrently_with_writes(index):
    fill(index, 10)
    queries = np.random.default_rng(4).standard_normal((4, ZDIM)).astype(np.float32)
    stop = threading.Event()

    def searcher() -> int:
        rounds = 0
        while not stop.is_set():
            distances, ids = index.search(queries, 5)
            owners, _ = index.segment_info(ids)
            assert all(o is None or o[:4] == "trk-" for o in owners.flat)
            # missing neighbours (a track deleted meanwhile) are padded with inf, last
            finite = np.where(np.isinf(distances), np.finfo(np.float32).max, distances)
            assert (np.diff(finite, axis=1) >= 0).all()
            rounds += 1
        return rounds

    with ThreadPoolExecutor(2) as pool:
        searches = [pool.submit(searcher) for _ in range(2)]
        rng = np.random.default_rng(8)
        try:
            for i in range(10, 22):
                index.add_track(*make_track(i, rng))
                if i % 3 == 0:
                    index.delete_track(f"trk-{i - 5:04d}")
        finally:
            stop.set()
        assert all(s.result() > 0 for s in searches)
    assert len(index) == len(list_all(index))


def test_reducer_ranks_identically_on_both_backends(tmp_path, backend):
    with (
        open_backend("faiss", tmp_path / "faiss") as ref,
        open_backend(backend, tmp_path / "other") as ix,
    ):
        fill(ref, 30, seed=2)
        fill(ix, 30, seed=2)
        rng = np.random.default_rng(6)
        for _ in range(3):
            target = ref.get_vectors(f"trk-{int(rng.integers(30)):04d}")[0]
            noisy = (target + 0.3 * rng.standard_normal(target.shape)).astype(np.float32)
            query = QuerySegments(noisy, np.arange(len(noisy)) * 5.0, 20.0, 20.0 + 5 * len(noisy))
            opts = SearchOptions(top_k=5, k=16, candidates=30, reduction="bpwr-3")
            want = rank_tracks(ref, query, opts)
            got = rank_tracks(ix, query, opts)
            assert [h.track.track_id for h in got] == [h.track.track_id for h in want]
            np.testing.assert_allclose(
                [h.distance for h in got], [h.distance for h in want], rtol=1e-5
            )
            assert [h.matches for h in got] == [h.matches for h in want]
            assert [t for t, _ in exhaustive_rank(ix, query, "bpwr-3", 5)] == [
                t for t, _ in exhaustive_rank(ref, query, "bpwr-3", 5)
            ]


# -- Milvus only --------------------------------------------------------------------------


@needs_milvus
def test_milvus_top10_matches_exact_faiss(tmp_path):
    """A few thousand vectors with clustered structure: the same top-10 as FAISS Flat."""
    identity = dict(IDENTITY, zdim=64)
    rng = np.random.default_rng(12)
    centres = rng.standard_normal((40, 64)).astype(np.float32)
    tracks = []
    for i in range(300):
        n = int(rng.integers(4, 12))
        v = centres[rng.integers(40, size=n)] + 0.5 * rng.standard_normal((n, 64))
        tracks.append(
            (
                TrackRecord(f"t{i:03d}", content_sha256=str(i)),
                v.astype(np.float32),
                np.arange(n) * 5.0,
            )
        )
    queries = (centres[rng.integers(40, size=50)] + 0.5 * rng.standard_normal((50, 64))).astype(
        np.float32
    )
    with (
        open_index(tmp_path / "faiss", identity, "Flat") as ref,
        open_backend("milvus", tmp_path / "milvus", identity) as ix,
    ):
        for record, v, s in tracks:
            ref.add_track(record, v, s)
            ix.add_track(record, v, s)
        assert ix.n_segments == ref.n_segments > 2000
        want_d, want_ids = ref.search(queries, 10)
        got_d, got_ids = ix.search(queries, 10)
        # ids are assigned independently: compare (track, start) of each neighbour
        want_t, want_s = ref.segment_info(want_ids)
        got_t, got_s = ix.segment_info(got_ids)
        np.testing.assert_array_equal(got_t, want_t)
        np.testing.assert_array_equal(got_s, want_s)
        np.testing.assert_allclose(got_d, want_d, rtol=1e-4, atol=1e-5)


@needs_milvus
def test_milvus_uncommitted_write_never_surfaces_and_is_cleaned(tmp_path, monkeypatch):
    from refrain.index.milvus_catalog import MilvusCatalog

    path = tmp_path / "idx"
    with open_backend("milvus", path) as ix:
        fill(ix, 5)
        record, vectors, starts = make_track(99, np.random.default_rng(0), n=4)

        def crash(*args, **kwargs):
            raise RuntimeError("simulated crash before the commit")

        monkeypatch.setattr(MilvusCatalog, "commit_track", crash)
        with pytest.raises(RuntimeError, match="simulated"):
            ix.add_track(record, vectors, starts)
        monkeypatch.undo()
        assert record.track_id not in ix and ix.stats().tombstones == 4
        _, ids = ix.search(vectors, 3)  # the vectors are in Milvus, but never returned
        assert all(t is not None for t in ix.segment_info(ids)[0].flat)
        n = ix.n_segments
    with open_backend("milvus", path) as ix:  # reopening deletes the pending range
        assert ix.stats().tombstones == 0 and ix._count() == n == ix.n_segments
        assert ix.add_track(record, vectors, starts) is AddResult.ADDED


@needs_milvus
def test_milvus_collection_of_another_model_or_catalog_is_refused(tmp_path):
    from refrain.index.milvus import MilvusOptions, open_milvus_index

    shared = MilvusOptions(uri=str(tmp_path / "shared.db"))
    with open_milvus_index(tmp_path / "a", IDENTITY, shared) as ix:
        fill(ix, 2)
    other = dict(IDENTITY, weights_sha256="cd" * 32)
    with pytest.raises(IdentityMismatchError, match="Milvus collection 'refrain_segments'"):
        open_milvus_index(tmp_path / "b", other, shared)
    with pytest.raises(CorruptIndexError, match="does not know"):
        open_milvus_index(tmp_path / "c", IDENTITY, shared)
    with open_milvus_index(tmp_path / "a", IDENTITY, shared) as ix:
        assert len(ix) == 2
    with pytest.raises(ValueError, match="float32"):
        from refrain.index import IndexOptions

        open_milvus_index(tmp_path / "d", IDENTITY, options=IndexOptions(vector_dtype="float16"))


@pytest.mark.slow
@needs_milvus
def test_service_on_the_milvus_backend(live_server, tmp_path):
    from refrain.service.settings import Settings

    from conftest import CKPT_A
    from helpers import SR, encode, synth_song

    settings = Settings(
        data_dir=tmp_path / "data", model=str(CKPT_A), open_writes=True, index_backend="milvus"
    )
    songs = [synth_song(30.0, seed) for seed in (21, 22)]
    server = live_server(settings)
    with server.client() as c:
        for i, song in enumerate(songs):
            r = c.post(
                "/v1/tracks",
                data={"track_id": f"m{i}"},
                files={"audio": ("a.flac", encode(song, "flac"))},
            )
            assert r.status_code == 201, r.text
        clip = encode(songs[1][5 * SR : 17 * SR], "wav")
        r = c.post("/v1/search", files={"audio": ("c.wav", clip)})
        assert r.status_code == 200 and r.json()["results"][0]["track_id"] == "m1"
        assert c.get("/v1/stats").json()["index"]["factory"] == "FLAT"
    server.stop()
    assert (tmp_path / "data" / "index" / "milvus.db").exists()
    with pytest.raises(ValueError, match="index_backend"):
        Settings(index_backend="annoy")


def test_unreachable_milvus_is_a_503():
    from refrain.index.milvus import BackendUnavailableError
    from refrain.service.http_errors import classify

    err = classify(BackendUnavailableError("Milvus search on 'refrain_segments' failed"))
    assert (err.status, err.code, err.headers) == (503, "index_unavailable", {"Retry-After": "5"})


def test_chroma_sequences_are_stored_replaced_and_deleted_with_their_tracks(tmp_path, backend):
    """A track's sequence is written with it (journal or Milvus catalog), survives a reopen
    and a snapshot, follows a replace, leaves with a delete, and stays out of the public
    record."""
    rng = np.random.default_rng(3)
    seqs = {f"s{i}": rng.integers(0, 256, 12 * (5 + i), dtype=np.uint8).tobytes() for i in range(4)}
    v, s = rng.standard_normal((3, ZDIM)).astype(np.float32), np.arange(3) * 5.0
    with open_backend(backend, tmp_path / "idx") as ix:
        for tid, seq in seqs.items():
            ix.add_track(TrackRecord(tid, content_sha256=tid, sequence=seq), v, s)
        ix.add_track(TrackRecord("plain", content_sha256="p"), v, s)  # an older writer's track
        assert ix.sequences([*seqs, "plain", "nope"]) == seqs
        record = ix.get_track("s1")
        assert record.sequence is None and "sequence" not in record.to_stored()
    with open_backend(backend, tmp_path / "idx") as ix:  # replayed or read back
        assert ix.sequences(list(seqs)) == seqs
        ix.snapshot()
        new = b"\x07" * 24
        ix.replace_track(TrackRecord("s2", content_sha256="x", sequence=new), v, s)
        assert ix.delete_track("s3")
    with open_backend(backend, tmp_path / "idx") as ix:
        assert ix.sequences([*seqs, "plain"]) == {"s0": seqs["s0"], "s1": seqs["s1"], "s2": new}


def test_a_catalog_from_before_sequences_gains_the_column(tmp_path):
    import sqlite3

    from refrain.index.catalog import Catalog

    path = tmp_path / "catalog.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE tracks (track_id TEXT PRIMARY KEY, title TEXT NOT NULL, artist TEXT NOT "
        "NULL, work_id TEXT, duration_s REAL, content_sha256 TEXT, n_segments INTEGER NOT NULL,"
        " first_segment_id INTEGER NOT NULL, added_at REAL NOT NULL) WITHOUT ROWID;"
        "INSERT INTO tracks VALUES ('old', 'T', 'A', NULL, 3.0, 'h', 1, 0, 1.0);"
    )
    db.commit()
    db.close()
    catalog = Catalog(path)
    assert catalog.get("old").title == "T" and catalog.sequences(["old"]) == {}
    assert [meta["track_id"] for meta, _ in catalog.dump()] == ["old"]
    catalog.close()
