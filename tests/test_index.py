"""SegmentIndex: writes, reads, exact search, persistence, identity, locking, recovery."""

from __future__ import annotations

import base64
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from refrain.index import (
    AddResult,
    IdentityMismatchError,
    IndexClosedError,
    IndexLockedError,
    IndexNotFoundError,
    IndexOptions,
    TrackExistsError,
    TrackNotFoundError,
    TrackRecord,
    open_index,
)

ZDIM = 16
IDENTITY = {
    "weights_sha256": "ab" * 32,
    "zdim": ZDIM,
    "shingle_len_s": 20.0,
    "hop_s": 5.0,
    "sample_rate": 16000,
}


def make_track(i: int, rng: np.random.Generator, n: int | None = None, version: int = 1):
    n = n if n is not None else int(rng.integers(1, 9))
    vectors = rng.standard_normal((n, ZDIM)).astype(np.float32)
    starts = np.arange(n) * 5.0
    record = TrackRecord(
        f"trk-{i:04d}",
        title=f"Song {i}",
        artist="Band",
        work_id=f"w{i % 7}",
        duration_s=20.0 + 5 * (n - 1),
        content_sha256=f"sha-{i}-v{version}",
    )
    return record, vectors, starts


def fill(index, n_tracks: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    stored = {}
    for i in range(n_tracks):
        record, vectors, starts = make_track(i, rng)
        assert index.add_track(record, vectors, starts) is AddResult.ADDED
        stored[record.track_id] = (vectors, starts)
    return stored


def exact_neighbours(index, queries, k):
    """Brute-force nsqeuc over every stored vector, by segment id."""
    tids = [t.track_id for t in list_all(index)]
    all_ids = np.concatenate([index.segment_ids(t) for t in tids])
    all_vectors = np.concatenate([index.get_vectors(t)[0] for t in tids])
    d = ((queries[:, None, :].astype(np.float64) - all_vectors[None]) ** 2).sum(-1) / ZDIM
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), all_ids[order]


def segment_ids_of(index, track_id: str, n: int) -> np.ndarray:
    ids = index.segment_ids(track_id)
    owners, _ = index.segment_info(ids)
    assert len(ids) == n and (owners == track_id).all()
    return ids


def list_all(index, limit: int = 7):
    out, cursor = [], None
    while True:
        page, cursor = index.list_tracks(limit, cursor)
        out += page
        if cursor is None:
            return out


@pytest.fixture
def index(tmp_path):
    with open_index(tmp_path / "idx", IDENTITY) as ix:
        yield ix


def test_add_get_and_stats(index):
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
    assert (stats.tracks, stats.segments, stats.factory) == (12, index.n_segments, "Flat")
    assert stats.bytes_on_disk > 0 and stats.seq == 12


def test_list_tracks_pagination_is_stable(index):
    fill(index, 25)
    page1, cursor = index.list_tracks(10)
    assert [t.track_id for t in page1] == [f"trk-{i:04d}" for i in range(10)]
    # writes between pages neither repeat nor skip tracks after the cursor
    index.delete_track("trk-0002")
    record, vectors, starts = make_track(5000, np.random.default_rng(9))
    index.add_track(record, vectors, starts)
    rest = []
    while cursor is not None:
        page, cursor = index.list_tracks(10, cursor)
        assert len(page) <= 10
        rest += page
    assert [t.track_id for t in rest] == [f"trk-{i:04d}" for i in range(10, 25)] + ["trk-5000"]
    assert index.list_tracks(100) == (list_all(index), None)
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
    assert index.stats().seq == seq  # nothing written
    new_record, new_vectors, new_starts = make_track(1, rng, n=6, version=2)
    with pytest.raises(TrackExistsError, match="replace=True"):
        index.add_track(new_record, new_vectors, new_starts)
    old_ids = segment_ids_of(index, record.track_id, 4)
    assert index.replace_track(new_record, new_vectors, new_starts) is AddResult.REPLACED
    got, _ = index.get_vectors(record.track_id)
    np.testing.assert_array_equal(got, new_vectors)
    assert index.get_track(record.track_id).n_segments == 6
    assert index.n_segments == 6 and len(index) == 1
    assert all(o is None for o in index.segment_info(old_ids)[0])
    other, v, s = make_track(2, rng)
    with pytest.raises(TrackNotFoundError, match="trk-0002"):
        index.replace_track(other, v, s)
    assert index.add_track(other, v, s, replace=True) is AddResult.ADDED


def test_batch_add_is_one_durable_write(tmp_path):
    rng = np.random.default_rng(5)
    items = [make_track(i, rng) for i in range(6)]
    path = tmp_path / "idx"
    with open_index(path, IDENTITY) as ix:
        ix.add_track(*items[0])
        seq = ix.stats().seq
        changed = make_track(1, rng, n=3, version=2)
        # A conflict or a repeated id fails the whole batch before anything is written.
        with pytest.raises(TrackExistsError, match="trk-0000"):
            ix.add_tracks([items[1], make_track(0, rng, version=2)])
        with pytest.raises(ValueError, match="trk-0001"):
            ix.add_tracks([items[1], changed])
        assert ix.stats().seq == seq and len(ix) == 1
        results = ix.add_tracks(items)
        assert results == [AddResult.UNCHANGED] + [AddResult.ADDED] * 5
        assert ix.stats().seq == seq + 5 and ix.stats().journal_records == 6
        assert ix.add_tracks([changed], replace=True) == [AddResult.REPLACED]
        assert ix.add_tracks([]) == []
    with open_index(path, IDENTITY) as ix:  # replayed from the journal
        want = {r.track_id: (v, s) for r, v, s in items} | {changed[0].track_id: changed[1:]}
        assert {t.track_id for t in list_all(ix)} == set(want)
        for tid, (vectors, starts) in want.items():
            got_v, got_s = ix.get_vectors(tid)
            np.testing.assert_array_equal(got_v, vectors)
            np.testing.assert_array_equal(got_s, starts)
            assert ix.get_track(tid).n_segments == len(vectors)
        queries = rng.standard_normal((4, ZDIM)).astype(np.float32)
        _, ids = ix.search(queries, 5)
        _, want_ids = exact_neighbours(ix, queries, 5)
        np.testing.assert_array_equal(ids, want_ids)


def test_torn_batch_keeps_whole_records_only(tmp_path):
    """A crash inside a batch's write leaves a prefix of whole records (none acknowledged)."""
    rng = np.random.default_rng(6)
    items = [make_track(i, rng, n=4) for i in range(4)]
    path = tmp_path / "idx"
    open_index(path, IDENTITY).close()
    saved = {f.name: f.read_bytes() for f in path.glob("catalog.sqlite*")}
    with open_index(path, IDENTITY) as ix:
        ix.add_tracks(items)
    for f in path.glob("catalog.sqlite*"):  # the catalog applies a batch once it is durable:
        f.unlink()  # a crash inside its journal write leaves the catalog as it was
    for name, data in saved.items():
        (path / name).write_bytes(data)
    journal = next(p for p in path.rglob("*") if p.is_file() and p.read_bytes()[:8] == b"RFRNJRNL")
    data = journal.read_bytes()
    second = data.index(b"RREC", data.index(b"RREC") + 1)
    third = data.index(b"RREC", second + 1)
    journal.write_bytes(data[: third - 7])  # the second record torn
    with open_index(path, IDENTITY) as ix:
        assert [t.track_id for t in list_all(ix)] == ["trk-0000"]
        np.testing.assert_array_equal(ix.get_vectors("trk-0000")[0], items[0][1])


def test_flat_search_is_exact(index):
    fill(index, 40)
    queries = np.random.default_rng(7).standard_normal((9, ZDIM)).astype(np.float32)
    distances, ids = index.search(queries, 10)
    want_d, want_ids = exact_neighbours(index, queries, 10)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(distances, want_d, rtol=1e-5, atol=1e-6)
    assert distances.shape == ids.shape == (9, 10) and ids.dtype == np.int64
    owners, starts = index.segment_info(ids)
    assert owners.shape == starts.shape == (9, 10)
    for row_o, row_s, row_i in zip(owners, starts, ids, strict=True):
        for tid, start, sid in zip(row_o, row_s, row_i, strict=True):
            vectors, track_starts = index.get_vectors(tid)
            first = segment_ids_of(index, tid, len(vectors))[0]
            assert start == track_starts[sid - first]


def test_search_pads_missing_neighbours(index):
    rng = np.random.default_rng(1)
    record, vectors, starts = make_track(0, rng, n=3)
    index.add_track(record, vectors, starts)
    distances, ids = index.search(vectors[:1], 5)
    assert (ids[0, 3:] == -1).all() and np.isinf(distances[0, 3:]).all()
    assert distances[0, 0] == 0 and ids[0, 0] >= 0
    owners, starts = index.segment_info(ids)
    assert owners[0, 4] is None and np.isnan(starts[0, 4])


def test_empty_index_search(index):
    distances, ids = index.search(np.zeros((2, ZDIM), np.float32), 3)
    assert (ids == -1).all() and np.isinf(distances).all()


@pytest.mark.parametrize(
    ("vectors", "starts", "error"),
    [
        (np.zeros((3, ZDIM + 1)), np.zeros(3), r"shape \(n, 16\), got shape \(3, 17\)"),
        (np.zeros((0, ZDIM)), np.zeros(0), "at least one segment"),
        (np.full((2, ZDIM), np.nan), np.zeros(2), "NaN"),
        (np.zeros((2, ZDIM)), np.zeros(3), "expected 2 start times"),
        (np.zeros((2, ZDIM)), np.array([0.0, -5.0]), ">= 0"),
    ],
)
def test_bad_input_is_rejected_and_harmless(index, vectors, starts, error):
    with pytest.raises(ValueError, match=error):
        index.add_track(TrackRecord("t"), vectors, starts)
    assert len(index) == 0 and index.stats().seq == 0
    with pytest.raises(ValueError, match="queries of shape"):
        index.search(np.zeros((2, 3)), 1)
    with pytest.raises(ValueError, match="track_id"):
        index.add_track(TrackRecord(""), np.zeros((1, ZDIM)), [0.0])


@pytest.mark.parametrize("factory", ["Flat", "HNSW16"])
def test_reopen_gives_identical_results(tmp_path, factory):
    path = tmp_path / "idx"
    queries = np.random.default_rng(5).standard_normal((6, ZDIM)).astype(np.float32)
    with open_index(path, IDENTITY, factory) as ix:
        fill(ix, 30)
        ix.snapshot()
        rng = np.random.default_rng(11)
        for i in range(30, 36):  # after the snapshot: only in the journal
            ix.add_track(*make_track(i, rng))
        ix.delete_track("trk-0001")  # in a chunk
        ix.delete_track("trk-0031")  # journal only
        ix.replace_track(*make_track(2, rng, version=2))
        before = (
            ix.search(queries, 8),
            list_all(ix),
            ix.get_vectors("trk-0002"),
            len(ix),
            ix.n_segments,
        )
    with open_index(path, IDENTITY) as ix:
        assert ix.factory == factory
        after = (
            ix.search(queries, 8),
            list_all(ix),
            ix.get_vectors("trk-0002"),
            len(ix),
            ix.n_segments,
        )
        np.testing.assert_array_equal(after[0][1], before[0][1])
        np.testing.assert_array_equal(after[0][0], before[0][0])
        assert after[1] == before[1] and after[3:] == before[3:]
        np.testing.assert_array_equal(after[2][0], before[2][0])
        ix.snapshot()
    with open_index(path, IDENTITY) as ix:  # from the snapshot alone
        np.testing.assert_array_equal(ix.search(queries, 8)[1], before[0][1])
        assert list_all(ix) == before[1]


def test_float16_store_keeps_rounded_vectors(tmp_path):
    opts = IndexOptions(vector_dtype="float16")
    rng = np.random.default_rng(2)
    record, vectors, starts = make_track(0, rng, n=5)
    with open_index(tmp_path / "idx", IDENTITY, options=opts) as ix:
        ix.add_track(record, vectors, starts)
        ix.snapshot()
        ix.add_track(*make_track(1, rng))
    with open_index(tmp_path / "idx", IDENTITY) as ix:
        got, _ = ix.get_vectors(record.track_id)
        np.testing.assert_array_equal(got, vectors.astype(np.float16).astype(np.float32))
        assert ix.stats().vector_dtype == "float16" and len(ix) == 2
        with pytest.raises(ValueError, match="float16"):
            ix.add_track(TrackRecord("big"), np.full((1, ZDIM), 1e6), [0.0])


def test_identity_mismatch_is_refused_with_instructions(tmp_path):
    with open_index(tmp_path / "idx", IDENTITY) as ix:
        fill(ix, 2)
    other = dict(IDENTITY, weights_sha256="cd" * 32, hop_s=2.5)
    with pytest.raises(IdentityMismatchError) as err:
        open_index(tmp_path / "idx", other)
    message = str(err.value)
    assert "weights_sha256" in message and "hop_s: index has 5.0, model has 2.5" in message
    assert "zdim" not in message and "refrain index build" in message and "--data DIR" in message
    with open_index(tmp_path / "idx", IDENTITY) as ix:  # the refusal left it usable
        assert len(ix) == 2
    with pytest.raises(ValueError, match="factory string 'Nope' for dimension 16: could not parse"):
        open_index(tmp_path / "other", IDENTITY, factory="Nope")
    assert not (tmp_path / "other").exists()


def test_open_errors(tmp_path):
    with pytest.raises(IndexNotFoundError):
        open_index(tmp_path / "missing", IDENTITY, create=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(IndexNotFoundError, match="not empty"):
        open_index(tmp_path / "junk", IDENTITY)
    with pytest.raises(ValueError, match="zdim"):
        open_index(tmp_path / "x", {"weights_sha256": "a"})
    with open_index(tmp_path / "idx", IDENTITY, factory="HNSW8"):
        pass
    with pytest.raises(ValueError, match="factory='HNSW8'"):
        open_index(tmp_path / "idx", IDENTITY, factory="Flat")


def test_second_writer_is_locked_out(tmp_path):
    ix = open_index(tmp_path / "idx", IDENTITY)
    with pytest.raises(IndexLockedError, match="already open for writing by process"):
        open_index(tmp_path / "idx", IDENTITY)
    ix.close()
    ix.close()  # idempotent
    with pytest.raises(IndexClosedError):
        ix.search(np.zeros((1, ZDIM)), 1)
    with open_index(tmp_path / "idx", IDENTITY) as again:
        assert len(again) == 0


def test_search_concurrently_with_writes(index):
    fill(index, 10)
    queries = np.random.default_rng(4).standard_normal((4, ZDIM)).astype(np.float32)
    stop = threading.Event()

    def searcher() -> int:
        rounds = 0
        while not stop.is_set():
            distances, ids = index.search(queries, 5)
            owners, _ = index.segment_info(ids)  # None if deleted since the search
            assert (ids >= 0).all() and all(o is None or o[:4] == "trk-" for o in owners.flat)
            assert (np.diff(distances, axis=1) >= 0).all()
            rounds += 1
        return rounds

    with ThreadPoolExecutor(2) as pool:
        searches = [pool.submit(searcher) for _ in range(2)]
        rng = np.random.default_rng(8)
        try:
            for i in range(10, 30):
                index.add_track(*make_track(i, rng))
                if i % 3 == 0:
                    index.delete_track(f"trk-{i - 5:04d}")
                if i == 20:
                    index.snapshot()
        finally:
            stop.set()
        assert all(s.result() > 0 for s in searches)  # re-raises a failed search
    assert len(index) == len(list_all(index))


def test_catalog_is_rebuilt_or_caught_up(tmp_path):
    path = tmp_path / "idx"
    with open_index(path, IDENTITY) as ix:
        fill(ix, 6)
        ix.snapshot()
        old = tmp_path / "old-catalog"
        old.mkdir()
        for f in path.glob("catalog.sqlite*"):
            shutil.copy(f, old / f.name)
        ix.add_track(*make_track(50, np.random.default_rng(0)))
        ix.delete_track("trk-0000")
        want = list_all(ix)
    # a catalog behind the journal is caught up
    for f in path.glob("catalog.sqlite*"):
        f.unlink()
    for f in old.iterdir():
        shutil.copy(f, path / f.name)
    with open_index(path, IDENTITY) as ix:
        assert list_all(ix) == want
    # a lost or unreadable catalog is rebuilt from the snapshot and journal
    for f in path.glob("catalog.sqlite*"):
        f.unlink()
    (path / "catalog.sqlite").write_bytes(b"garbage" * 100)
    with open_index(path, IDENTITY) as ix:
        assert list_all(ix) == want and ix.get_track("trk-0050").n_segments > 0


# A version-1 index as written by this code: index.json and a journal of two records (add "a"
# with two 4-d segments, add "b" with one). It must keep loading as the format evolves.
GOLDEN_INDEX_JSON = (
    '{"created_at": 0, "factory": "Flat", "format": "refrain-segment-index", '
    '"identity": {"weights_sha256": "golden", "zdim": 4}, "vector_dtype": "float32", '
    '"version": 1, "zdim": 4}'
)


def _golden_journal() -> bytes:
    from refrain.index.journal import Op, Record, encode

    head = b"RFRNJRNL" + (1).to_bytes(4, "little") + (4).to_bytes(4, "little")
    meta = {
        "track_id": "a",
        "title": "A",
        "artist": "",
        "work_id": "w",
        "duration_s": 25.0,
        "content_sha256": "x",
        "n_segments": 2,
        "added_at": 1.0,
    }
    a = Record(
        1, Op.ADD, "a", meta, 0, np.array([0.0, 5.0]), np.arange(8, dtype=np.float32).reshape(2, 4)
    )
    b = Record(
        2,
        Op.ADD,
        "b",
        dict(meta, track_id="b", n_segments=1),
        2,
        np.array([0.0]),
        np.ones((1, 4), np.float32),
    )
    return head + encode(a) + encode(b)


GOLDEN_JOURNAL_B64 = (
    "UkZSTkpSTkwBAAAABAAAAFJSRUPHAAAAL36UNAEAAAAAAAAAAQAAAHsAAAAAAAAAAAAAAAIAAAB7ImFkZGVkX2F0"
    "IjoxLjAsImFydGlzdCI6IiIsImNvbnRlbnRfc2hhMjU2IjoieCIsImR1cmF0aW9uX3MiOjI1LjAsIm5fc2VnbWVu"
    "dHMiOjIsInRpdGxlIjoiQSIsInRyYWNrX2lkIjoiYSIsIndvcmtfaWQiOiJ3In0AAAAAAAAAAAAAAAAAABRAAAAA"
    "AAAAgD8AAABAAABAQAAAgEAAAKBAAADAQAAA4EBSUkVDrwAAACsScVICAAAAAAAAAAEAAAB7AAAAAgAAAAAAAAAB"
    "AAAAeyJhZGRlZF9hdCI6MS4wLCJhcnRpc3QiOiIiLCJjb250ZW50X3NoYTI1NiI6IngiLCJkdXJhdGlvbl9zIjoy"
    "NS4wLCJuX3NlZ21lbnRzIjoxLCJ0aXRsZSI6IkEiLCJ0cmFja19pZCI6ImIiLCJ3b3JrX2lkIjoidyJ9AAAAAAAA"
    "AAAAAIA/AACAPwAAgD8AAIA/"
)


def test_golden_v1_index_still_loads(tmp_path):
    assert base64.b64encode(_golden_journal()).decode() == GOLDEN_JOURNAL_B64  # format frozen
    path = tmp_path / "golden"
    path.mkdir()
    (path / "index.json").write_text(GOLDEN_INDEX_JSON)
    (path / "journal.log").write_bytes(base64.b64decode(GOLDEN_JOURNAL_B64))
    with open_index(path, {"weights_sha256": "golden", "zdim": 4}) as ix:
        assert [t.track_id for t in list_all(ix)] == ["a", "b"]
        vectors, starts = ix.get_vectors("a")
        np.testing.assert_array_equal(vectors, np.arange(8).reshape(2, 4))
        np.testing.assert_array_equal(starts, [0.0, 5.0])
        assert ix.get_track("a").title == "A" and ix.get_track("b").n_segments == 1
        distances, ids = ix.search(np.ones((1, 4), np.float32), 1)
        assert ids[0, 0] == 2 and distances[0, 0] == 0
        assert Path(path / "catalog.sqlite").exists()


def test_transposed_query_is_ranked_by_its_best_key(index):
    from refrain.search.ranking import (
        QuerySegments,
        SearchOptions,
        exhaustive_rank,
        key_shifts,
        rank_tracks,
    )

    assert key_shifts(0) == (0,) and key_shifts(2) == (0, -1, 1, -2, 2)
    with pytest.raises(ValueError):
        key_shifts(7)
    stored = fill(index, 20, seed=3)
    target = next(t for t, (v, _) in stored.items() if len(v) >= 3)
    vectors, _ = stored[target]
    rng = np.random.default_rng(9)
    shifts = key_shifts(2)
    # The query as sent is noise; at shift +1 it is (nearly) the first 3 segments of the target.
    blocks = [rng.standard_normal((3, ZDIM)).astype(np.float32) for _ in shifts]
    blocks[shifts.index(1)] = vectors[:3] + 0.01 * rng.standard_normal((3, ZDIM)).astype(np.float32)
    starts = np.arange(3) * 5.0
    query = QuerySegments(np.concatenate(blocks), starts, 20.0, 30.0, shifts)
    hits = rank_tracks(index, query, SearchOptions(top_k=5, reduction="min"))
    assert hits[0].track.track_id == target and hits[0].transposition == 1
    assert all(m.query_start_s == m.ref_start_s for m in hits[0].matches)
    # The same as an exhaustive comparison over every track and key.
    exact = exhaustive_rank(index, query, "min", 5)
    assert [t for t, _ in exact] == [h.track.track_id for h in hits]
    np.testing.assert_allclose(
        [d for _, d in exact], [h.distance for h in hits], rtol=1e-5, atol=1e-6
    )  # float32 rounding near 0
    # Without the key shifts the target is not found first.
    plain = QuerySegments(blocks[0], starts, 20.0, 30.0)
    assert (
        rank_tracks(index, plain, SearchOptions(top_k=5, reduction="min"))[0].track.track_id
        != target
    )
    with pytest.raises(ValueError, match="shifts"):
        QuerySegments(blocks[0], starts, 20.0, 30.0, shifts)
