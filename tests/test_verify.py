"""Alignment verification: the embedding's shortlist re-ranked by Qmax fused with the distance.

The fusion's arithmetic on constructed matrices, the shortlisted Qmax against the full matrix
on real audio, and `refrain evaluate --verify` end to end on synthesised versions.
"""

import json

import numpy as np
import pytest
import soundfile as sf

from refrain.search.fusion import BELOW, Fusion
from refrain.service.cli import main
from refrain.training.retrieval_metrics import retrieval_metrics
from refrain.training.verified import EXPANSIONS, WEIGHTS, fit_fusion

from helpers import SR, pitch_shift, synth_song, time_stretch

pytest.importorskip("librosa")  # the train extra


def test_weight_zero_is_the_embeddings_ranking():
    rng = np.random.default_rng(0)
    dist = rng.random((6, 9))
    dist[0, 0] = np.inf  # the query itself
    fusion = Fusion(candidates=4, weight=0.0, expand=0.0)
    shortlist = fusion.shortlist(dist)
    assert all(len(s) == 4 for s in shortlist) and 0 not in shortlist[0]
    qmax = [rng.random(len(s)) * 30 for s in shortlist]
    fused = fusion.rerank(dist, qmax, shortlist, [20] * 6)
    for row, frow in zip(dist, fused, strict=True):
        np.testing.assert_array_equal(
            np.argsort(row, kind="stable"), np.argsort(frow, kind="stable")
        )
    assert np.isinf(fused[0, 0]) and (fused[:, :][np.isfinite(fused)] < 2 * BELOW).all()


def test_a_large_weight_orders_the_shortlist_by_alignment_and_keeps_the_rest_below():
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    fusion = Fusion(candidates=3, weight=1000.0, expand=0.0)
    shortlist = fusion.shortlist(dist)
    np.testing.assert_array_equal(shortlist[0], [0, 1, 2])
    fused = fusion.rerank(dist, [np.array([1.0, 50.0, 9.0])], shortlist, [20])
    assert list(np.argsort(fused[0])) == [1, 2, 0, 3, 4, 5]  # by Qmax, then the embedding's


def test_the_alignment_overturns_a_narrow_margin_and_not_a_wide_one():
    """The terms keep their scales: the same Qmax lead reorders candidates whose distances
    are alike and leaves a clear embedding margin alone (a standardised fusion would treat
    both queries the same). Qmax counts per query frame: a clip twice as long needs twice
    the Qmax for the same effect."""
    fusion = Fusion(candidates=2, weight=1.6)
    qmax = np.array([10.0, 30.0])  # the second candidate aligns better: 1.0 per frame more
    narrow = fusion.fuse(np.array([0.50, 0.60]), qmax, 20)
    wide = fusion.fuse(np.array([0.50, 3.00]), qmax, 20)
    assert narrow[1] > narrow[0] and wide[0] > wide[1]
    np.testing.assert_allclose(narrow, [-0.5 + 1.6 * 0.5, -0.6 + 1.6 * 1.5])
    longer = fusion.fuse(np.array([0.50, 0.60]), qmax * 2, 40)
    np.testing.assert_allclose(longer, narrow)
    # a candidate with no stored sequence takes the others' median Qmax
    missing = fusion.fuse(np.array([0.5, 0.6, 0.7]), np.array([10.0, np.nan, 30.0]), 20)
    np.testing.assert_allclose(missing[1], -0.6 + 1.6 * 1.0)
    with pytest.raises(ValueError, match="frame"):
        fusion.fuse(np.array([0.5]), np.array([1.0]), 0)


def test_expansion_lifts_what_resembles_the_first_candidate():
    """After fusing, each candidate loses `expand` times its distance to the candidate the
    fusion put first: a version far from the clip but close to its best match rises above a
    track nearer the clip that resembles nothing in the list; the first stays first."""
    dist = np.array([[1.0, 2.2, 2.0, 5.0]])  # 0: the clip's version; 1: another, farther
    between = np.array(
        [[0.0, 1.2, 3.0, 6.0], [1.2, 0.0, 3.2, 6.2], [3.0, 3.2, 0.0, 5.5], [6.0, 6.2, 5.5, 0.0]]
    )
    qmax, frames = [np.zeros(4)], [20]
    shortlist = [np.arange(4)]
    plain = Fusion(candidates=4, weight=0.0, expand=0.0).rerank(dist, qmax, shortlist, frames)
    expanded = Fusion(candidates=4, weight=0.0, expand=0.5)
    out = expanded.rerank(dist, qmax, shortlist, frames, between)
    assert list(np.argsort(plain[0])) == [0, 2, 1, 3]
    assert list(np.argsort(out[0])) == [0, 1, 2, 3]
    np.testing.assert_allclose(out[0], [1.0, 2.8, 3.5, 8.0])
    fused = np.array([-1.0, -2.2, -2.0, -5.0])
    np.testing.assert_allclose(
        expanded.expanded(fused, between[0]), [-1.0, -2.8, -3.5, -8.0]
    )  # the first's own distance counts as 0
    with pytest.raises(ValueError, match="distances to each other"):
        expanded.rerank(dist, qmax, shortlist, frames)
    with pytest.raises(ValueError, match="expansion"):
        Fusion(expand=-0.5)
    assert Fusion.from_dict(Fusion().to_dict()) == Fusion()
    assert Fusion.from_dict({"candidates": 20, "weight": 0.5}).expand == 0.0  # older files


def test_fit_finds_the_weight_that_helps():
    # 4 works x 3 versions; the embedding confuses works pairwise, the alignment does not
    labels = np.repeat(np.arange(4), 3)
    rng = np.random.default_rng(1)
    same = labels[:, None] == labels[None, :]
    dist = rng.random((12, 12)) + 0.4 * same
    np.fill_diagonal(dist, np.inf)
    qmax_full = np.where(same, 40.0, 5.0) + rng.random((12, 12))
    ids = np.arange(12)
    base = retrieval_metrics(dist, labels, labels, ids, ids)["MAP"]
    shortlist = Fusion(candidates=11).shortlist(dist)
    qmax = [qmax_full[i, cols] for i, cols in enumerate(shortlist)]
    frames = [20] * 12
    best, scores = fit_fusion(
        dist, qmax, shortlist, frames, labels, labels, ids, ids, candidates=11
    )
    assert scores[0.0] == pytest.approx(base) and base < 0.7
    assert best.weight > 0 and scores[best.weight] == pytest.approx(1.0)
    # a shorter shortlist is a prefix of a longer one (what the evaluation's sweep relies on)
    for c in (2, 5):
        for short, long in zip(Fusion(candidates=c).shortlist(dist), shortlist, strict=True):
            np.testing.assert_array_equal(short, long[:c])
    with pytest.raises(ValueError, match="candidates"):
        Fusion(candidates=1)
    with pytest.raises(ValueError, match="weight"):
        Fusion(weight=-1)


def test_shortlisted_qmax_is_qmax_in_the_local_oti_key(tmp_path):
    """Verification's Qmax is the baseline's, the query transposed by the key that best fits
    some stretch of the candidate (local OTI); for whole tracks of one length that key is
    OTI's, so the shortlist equals the pairwise baseline's matrix there."""
    from refrain.model.align import local_oti
    from refrain.model.audio import resample
    from refrain.model.qmax import (
        QmaxScorer,
        _unit,
        cross_recurrence,
        delay_embed,
        qmax,
        shortlist_qmax,
    )

    scorer = QmaxScorer(workers=1)
    p = scorer.params
    songs = [synth_song(20.0, seed) for seed in (21, 22, 23)]
    chroma = [scorer.chroma(resample(x.mean(1).astype(np.float32), SR, 16000)) for x in songs]
    queries = [chroma[0][5:30], np.roll(chroma[1], 2, axis=1), chroma[2]]
    (full,), _ = scorer.distances([queries], chroma)
    shortlists = [np.array([2, 0]), np.array([1]), np.array([0, 1, 2])]
    rows, cost = shortlist_qmax(queries, chroma, shortlists, p)
    for i, cols in enumerate(shortlists):
        for got, j in zip(rows[i], cols, strict=True):
            k = local_oti(queries[i], chroma[j])
            states = _unit(delay_embed(np.roll(queries[i], k, axis=1), p.m, p.tau))
            plot = cross_recurrence(states, _unit(delay_embed(chroma[j], p.m, p.tau)), p.kappa)
            assert got == qmax(plot, p.gap_onset, p.gap_extend)
    np.testing.assert_allclose(rows[2], 1.0 / full[2] - 1.0, rtol=1e-6)
    assert rows[0][1] > rows[0][0]  # the excerpt of song 0 aligns with song 0 best
    assert cost.pairs == 6


@pytest.mark.slow
def test_evaluate_reports_verified_levels_beside_the_model(tmp_path, capsys):
    rows = ["clique,path"]
    for w, seed in enumerate((31, 32, 33)):
        x = synth_song(16.0, seed)
        for name, y in {"orig": x, "up2": pitch_shift(x, 2), "fast": time_stretch(x, 1.1)}.items():
            sf.write(tmp_path / f"w{w}_{name}.flac", y, SR)
            rows.append(f"w{w},w{w}_{name}.flac")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    out = tmp_path / "eval.json"
    argv = [
        "evaluate",
        "--manifest",
        str(manifest),
        "--query-seconds",
        "10",
        "--verify",
        "4",
        "--verify-weight",
        "0",
        "--verify-expand",
        "0",
        "--verify-sweep",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "track (bpwr-10) +verify" in printed and "verification:" in printed
    report = json.loads(out.read_text())
    results = report["results"]
    # weight 0, no expansion: verification may not change a single rank
    for level in ("track (bpwr-10)", "segment 10 s (min)"):
        assert results[f"{level} +verify"]["map"] == results[level]["map"]
    # the sweep: every weight of the grid at 4 candidates (none of its smaller sizes is below
    # 4), then every expansion weight at 4 x 0, from the same Qmax scores; weight 0 and
    # expansion 0 again change nothing
    swept = [k for k in results if "+verify " in k]
    assert len(swept) == 2 * (len(WEIGHTS) + len(EXPANSIONS))
    for level in ("track (bpwr-10)", "segment 10 s (min)"):
        assert results[f"{level} +verify 4x0"]["map"] == results[level]["map"]
        assert results[f"{level} +verify 4x0+0"]["map"] == results[level]["map"]
        assert f"{level} +verify 4x1.6" in results and f"{level} +verify 4x0+0.5" in results
    v = report["verification"]
    assert (v["candidates"], v["weight"], v["expand"]) == (4, 0.0, 0.0)
    assert v["pairs"] == 9 * 4 + 9 * 4 and v["wall_s"] > 0


def test_verified_hits_are_scored_with_their_standing_among_the_candidates(tmp_path):
    """`rank_tracks` hands the fused score each aligned track's distance, Qmax per query frame
    and standardised log Qmax among the candidates (the feature `refrain calibrate` fits),
    and serves what it returns."""
    from test_align import chroma_walk
    from test_index import IDENTITY, ZDIM

    from refrain.index import TrackRecord, open_index
    from refrain.model.sequence import decode, encode
    from refrain.search.ranking import QuerySegments, SearchOptions, rank_tracks

    rng = np.random.default_rng(8)
    refs = [chroma_walk(rng, 120) for _ in range(6)]
    vectors = rng.standard_normal((6, 3, ZDIM)).astype(np.float32)
    starts = np.arange(3) * 5.0
    calls = {}

    def fused(distance: float, per_frame: float, relative: float) -> float:
        calls[round(distance, 6)] = (per_frame, relative)
        return 1 / (1 + np.exp(-relative))

    with open_index(tmp_path / "idx", IDENTITY) as ix:
        for i, ref in enumerate(refs):
            record = TrackRecord(f"t{i}", content_sha256=f"t{i}", sequence=encode(ref))
            ix.add_track(record, vectors[i], starts)
        chroma = decode(encode(np.roll(refs[4][30:90], 2, axis=1)))  # 30 s of t4, transposed
        query = QuerySegments(vectors[4][:2] + 0.5, starts[:2], 20.0, 30.0, chroma=chroma)
        hits = rank_tracks(ix, query, SearchOptions(top_k=6, verify=6), fused_score=fused)
    assert len(calls) == len(hits) == 6
    assert hits[0].track.track_id == "t4"
    qmax = np.array([h.alignment for h in hits])
    want = Fusion.standard_scores(qmax)  # all six are the candidates
    for h, z in zip(hits, want, strict=True):
        per_frame, relative = calls[round(h.distance, 6)]
        assert per_frame == pytest.approx(h.alignment / len(chroma))
        assert relative == pytest.approx(z) and h.score == pytest.approx(1 / (1 + np.exp(-z)))
    assert want[0] == want.max() > 1.5  # the source stands out among its candidates


def test_search_expands_with_the_first_verified_track(tmp_path):
    """In `rank_tracks`, a version that lies farther from the clip than an unrelated track,
    but close to the clip's best match, comes second once expansion counts each candidate's
    distance to the first (from the stored segments of both); with expansion off it does not."""
    from test_align import chroma_walk
    from test_index import IDENTITY, ZDIM

    from refrain.index import TrackRecord, open_index
    from refrain.model.sequence import decode, encode
    from refrain.search.ranking import QuerySegments, SearchOptions, rank_tracks

    rng = np.random.default_rng(9)
    basis = np.eye(ZDIM, dtype=np.float32) * np.sqrt(ZDIM)  # nsqeuc(0, basis[k] * a) = a^2
    clip = np.full(ZDIM, 0.1, dtype=np.float32)
    offsets = {
        "best": basis[1] * 1.0,  # the clip's version: distance 1.0
        "other-version": basis[1] * 1.0 + basis[2] * 1.1,  # 2.21 from the clip, 1.21 from best
        "unrelated": basis[3] * 1.4,  # 1.96 from the clip, 2.96 from best
        "far": basis[4] * 2.5,
    }
    starts = np.arange(3) * 5.0
    with open_index(tmp_path / "idx", IDENTITY) as ix:
        for tid, off in offsets.items():
            vectors = np.tile(clip + off, (3, 1)) + rng.normal(0, 1e-3, (3, ZDIM)).astype(
                np.float32
            )
            sequence = encode(chroma_walk(rng, 60))
            ix.add_track(TrackRecord(tid, content_sha256=tid, sequence=sequence), vectors, starts)
        chroma = decode(encode(chroma_walk(rng, 20)))
        query = QuerySegments(np.tile(clip, (2, 1)), starts[:2], 20.0, 10.0, chroma=chroma)

        def order(expand: float) -> list[str]:
            opts = SearchOptions(top_k=4, verify=4, verify_weight=0.0, verify_expand=expand)
            return [h.track.track_id for h in rank_tracks(ix, query, opts)]

        assert order(0.0) == ["best", "unrelated", "other-version", "far"]
        assert order(0.5) == ["best", "other-version", "unrelated", "far"]


def test_new_sequences_are_scored_on_the_upper_chroma_and_older_ones_on_the_full(tmp_path):
    """An index holding sequences of both formats: candidates stored with both chromas are
    scored by Qmax of the query's upper chroma against theirs, those stored by an older
    version (the full chroma alone) by Qmax of the full chromas, and every returned track
    is located on the full chroma all the same."""
    from test_align import chroma_walk
    from test_index import IDENTITY, ZDIM

    from refrain.index import TrackRecord, open_index
    from refrain.model.align import plots
    from refrain.model.sequence import UPPER, decode, decode_upper, encode
    from refrain.search.ranking import QuerySegments, SearchOptions, rank_tracks
    from refrain.search.verification import Verification

    rng = np.random.default_rng(10)
    full = [chroma_walk(rng, 120) for _ in range(6)]
    upper = [chroma_walk(rng, 120) for _ in range(6)]
    vectors = rng.standard_normal((6, 3, ZDIM)).astype(np.float32)
    starts = np.arange(3) * 5.0
    ids = [f"t{i}" for i in range(6)]
    with open_index(tmp_path / "idx", IDENTITY) as ix:
        for i, tid in enumerate(ids):
            both = encode(full[i], upper[i]) if i < 3 else encode(full[i])
            ix.add_track(TrackRecord(tid, content_sha256=tid, sequence=both), vectors[i], starts)
        stored = ix.sequences(ids)
        q_full = decode(encode(full[1][30:90]))  # 30 s of t1
        q_upper = decode(encode(upper[1][30:90]))
        v = Verification(ix, ids, [1.0] * 6, q_full, None, Fusion(6, 3.2, 0.0), q_upper)
        on_upper = plots(q_upper, [decode_upper(stored[t]) for t in ids[:3]], UPPER).qmax()
        on_full = plots(q_full, [decode(stored[t]) for t in ids[3:]]).qmax()
        assert [v.qmax[t] for t in ids] == pytest.approx([*on_upper, *on_full])
        assert v.order[0] == "t1" and v.qmax["t1"] > 40
        found = v.locate([(t, 60.0) for t in ids], 1, 30.0)
        assert sorted(found) == ids
        (match,) = found["t1"]
        assert match.ref_start_s == pytest.approx(15.0, abs=1.0)
        # a query without its upper chroma scores every candidate on the full chroma
        v_full = Verification(ix, ids, [1.0] * 6, q_full, None, Fusion(6, 3.2, 0.0))
        everything = plots(q_full, [decode(stored[t]) for t in ids]).qmax()
        assert [v_full.qmax[t] for t in ids] == pytest.approx(list(everything))
        query = QuerySegments(
            vectors[1][:2] + 0.5, starts[:2], 20.0, 30.0, chroma=q_full, upper=q_upper
        )
        hits = rank_tracks(ix, query, SearchOptions(top_k=3, verify=6))
    assert hits[0].track.track_id == "t1" and hits[0].alignment == pytest.approx(v.qmax["t1"])
