import json
import math
import time

import numpy as np
import pytest
import torch

from refrain.training import retrieval_metrics as metrics
from refrain.training.retrieval_metrics import (
    Estimate,
    EvalResult,
    average_precision,
    format_table,
    mean_ci95,
    normalized_average_rank,
    rank_of_first_correct,
    retrieval_metrics,
    top_k_hit,
)

T, F = True, False


# Hand-computed rankings.


def test_relevant_irrelevant_relevant():
    d, rel = [0.1, 0.2, 0.3], [T, F, T]
    assert average_precision(d, rel) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert rank_of_first_correct(d, rel) == 1
    # first relevant: 0 of 1 irrelevant before it; second: 1 of 1.
    assert normalized_average_rank(d, rel) == pytest.approx(50.0)
    assert top_k_hit(d, rel, 1)


def test_relevant_third_of_four():
    d, rel = [0.1, 0.2, 0.3, 0.4], [F, F, T, F]
    assert average_precision(d, rel) == pytest.approx(1 / 3)
    assert rank_of_first_correct(d, rel) == 3
    assert normalized_average_rank(d, rel) == pytest.approx(100 * 2 / 3)
    assert not top_k_hit(d, rel, 2)
    assert top_k_hit(d, rel, 3)


def test_ranking_is_by_ascending_distance():
    d, rel = [0.5, 0.1, 0.3, 0.2], [T, F, T, F]
    # order: F(0.1) F(0.2) T(0.3) T(0.5)
    assert average_precision(d, rel) == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert rank_of_first_correct(np.array(d), np.array(rel)) == 3
    assert normalized_average_rank(d, rel) == pytest.approx(100.0)


def test_perfect_ranking_and_all_relevant():
    assert average_precision([0.1, 0.2, 0.9], [T, T, F]) == pytest.approx(1.0)
    assert normalized_average_rank([0.1, 0.2, 0.9], [T, T, F]) == 0.0
    assert normalized_average_rank([0.3, 0.2], [T, T]) == 0.0
    assert average_precision([0.3, 0.2], [T, T]) == 1.0


def test_ties_keep_input_order():
    d = [0.2, 0.2, 0.1]
    assert rank_of_first_correct(d, [F, T, F]) == 3
    assert rank_of_first_correct(d, [T, F, F]) == 2


def test_infinite_distances_rank_last():
    assert rank_of_first_correct([math.inf, 0.5, 0.7], [T, F, T]) == 2


@pytest.mark.parametrize(
    "d, rel, match",
    [
        ([0.1, 0.2], [F, F], "relevant"),
        ([0.1, math.nan], [T, F], "NaN"),
        ([0.1, 0.2], [1, 0], "boolean"),
        ([0.1, 0.2], [T], "same length"),
        ([[0.1, 0.2]], [[T, F]], "1-D"),
    ],
)
def test_single_query_errors(d, rel, match):
    for fn in (average_precision, rank_of_first_correct, normalized_average_rank):
        with pytest.raises(ValueError, match=match):
            fn(d, rel)


def test_top_k_rejects_bad_k():
    with pytest.raises(ValueError, match="k must"):
        top_k_hit([0.1], [T], 0)


# The reference formulas, restated in torch, on random tie-free data.


def ref_average_precision(d, rel):
    r = rel.double()[torch.argsort(d)]
    prec = torch.cumsum(r, 0) / torch.arange(1, len(r) + 1)
    return (prec * r).sum() / r.sum()


def ref_rank_of_first_correct(d, rel):
    return torch.argmax(rel.double()[torch.argsort(d)]) + 1


def ref_rank_percentile(d, rel):
    r = rel.double()[torch.argsort(d)]
    normrank = torch.cumsum(1 - r, 0) / torch.sum(1 - r)
    return 100 * (r * normrank).sum() / r.sum()


def test_matches_reference_formulas_on_random_data():
    rng = np.random.default_rng(0)
    for _trial in range(200):
        n = int(rng.integers(2, 60))
        d = rng.random(n)
        rel = rng.random(n) < rng.uniform(0.05, 0.6)
        rel[rng.integers(n)] = True
        if rel.all():
            rel[0] = False
        td, trel = torch.from_numpy(d), torch.from_numpy(rel)
        assert average_precision(d, rel) == pytest.approx(
            ref_average_precision(td, trel).item(), abs=1e-12
        )
        assert rank_of_first_correct(d, rel) == ref_rank_of_first_correct(td, trel).item()
        assert normalized_average_rank(d, rel) == pytest.approx(
            ref_rank_percentile(td, trel).item(), abs=1e-9
        )


# Whole-matrix evaluation.


def _toy_collection():
    # Five tracks of three works; track 4 is alone in its work.
    labels = np.array([0, 0, 1, 1, 2])
    rng = np.random.default_rng(4)
    dist = rng.random((5, 5))
    np.fill_diagonal(dist, 0.0)  # every track is closest to itself
    return dist, labels


def test_retrieval_metrics_excludes_the_query_itself():
    dist, labels = _toy_collection()
    ids = np.arange(5)
    out = retrieval_metrics(dist, labels, labels, ids, ids)
    assert out["n_queries"] == 4 and out["n_skipped"] == 1
    assert out["per_query"]["index"].tolist() == [0, 1, 2, 3]
    for row, q in enumerate(out["per_query"]["index"]):
        others = ids != q
        d, rel = dist[q, others], labels[others] == labels[q]
        assert out["per_query"]["ap"][row] == pytest.approx(average_precision(d, rel))
        assert out["per_query"]["rank1"][row] == rank_of_first_correct(d, rel)
        assert out["per_query"]["top1"][row] == float(top_k_hit(d, rel, 1))
        # As in the reference, the query stays in the list as an irrelevant item ranked last,
        # which counts among the irrelevant items that NAR normalises by.
        kept_d = np.where(ids == q, np.inf, dist[q])
        kept_rel = (labels == labels[q]) & (ids != q)
        nar = normalized_average_rank(kept_d, kept_rel)
        assert out["per_query"]["nar"][row] == pytest.approx(nar)
        n_irrelevant = (~rel).sum()
        removed = normalized_average_rank(d, rel)
        assert nar == pytest.approx(removed * n_irrelevant / (n_irrelevant + 1))
    assert out["MAP"] == pytest.approx(out["per_query"]["ap"].mean())
    assert out["MR1"] == pytest.approx(out["per_query"]["rank1"].mean())
    assert out["top10"] == 1.0  # five candidates: always within the top 10


def test_retrieval_metrics_matches_reference_protocol():
    dist, labels = _toy_collection()
    ids = np.arange(5)
    out = retrieval_metrics(dist, labels, labels, ids, ids)
    for row, q in enumerate(out["per_query"]["index"]):
        # the reference: own distance to +inf, own entry not relevant, same candidate list
        d = torch.from_numpy(np.where(ids == q, np.inf, dist[q]))
        rel = torch.from_numpy((labels == labels[q]) & (ids != q))
        assert out["per_query"]["ap"][row] == pytest.approx(ref_average_precision(d, rel).item())
        assert out["per_query"]["nar"][row] == pytest.approx(ref_rank_percentile(d, rel).item())


def test_retrieval_metrics_without_ids_counts_self_as_relevant():
    dist, labels = _toy_collection()
    out = retrieval_metrics(dist, labels, labels, ks=(1,))
    assert out["n_queries"] == 5 and out["n_skipped"] == 0
    assert out["top1"] == 1.0 and out["MR1"] == 1.0
    assert "top10" not in out


def test_retrieval_metrics_blocks_agree(monkeypatch):
    rng = np.random.default_rng(8)
    qlab, clab = rng.integers(0, 6, 40), rng.integers(0, 6, 30)
    dist = rng.random((40, 30))
    whole = retrieval_metrics(dist, qlab, clab)
    monkeypatch.setattr(metrics, "_MAX_BLOCK_ELEMENTS", 70)  # two query rows per block
    blocked = retrieval_metrics(dist, qlab, clab)
    for key in ("index", "ap", "rank1", "nar", "top1", "top10"):
        np.testing.assert_array_equal(whole["per_query"][key], blocked["per_query"][key])
    assert whole["n_queries"] + whole["n_skipped"] == 40


def test_retrieval_metrics_errors():
    dist, labels = _toy_collection()
    with pytest.raises(ValueError, match="both"):
        retrieval_metrics(dist, labels, labels, query_ids=np.arange(5))
    with pytest.raises(ValueError, match="labels"):
        retrieval_metrics(dist, labels[:4], labels)
    with pytest.raises(ValueError, match="none of the"):
        retrieval_metrics(dist, labels, labels + 10)
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(dist, labels, labels, ks=(0,))


# Confidence intervals and reports.


def test_mean_ci95_known_sample():
    mean, low, high = mean_ci95([1, 2, 3, 4, 5])
    half = 1.96 * math.sqrt(2.5) / math.sqrt(5)  # sample std sqrt(2.5)
    assert mean == 3.0
    assert low == pytest.approx(3.0 - half) and high == pytest.approx(3.0 + half)
    assert mean_ci95([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    one = mean_ci95([0.7])
    assert one[0] == 0.7 and math.isnan(one[1]) and math.isnan(one[2])
    with pytest.raises(ValueError):
        mean_ci95([])


def test_eval_result_json_and_table():
    dist, labels = _toy_collection()
    ids = np.arange(5)
    track = EvalResult.from_metrics(retrieval_metrics(dist, labels, labels, ids, ids))
    assert track.n_queries == 4 and track.n_skipped == 1
    assert track.map.mean == pytest.approx(retrieval_metrics(dist, labels, labels, ids, ids)["MAP"])
    loaded = json.loads(track.to_json())
    assert loaded["n_queries"] == 4 and set(loaded["map"]) == {"mean", "low", "high"}

    single = EvalResult(*[Estimate(0.5, math.nan, math.nan)] * 5, n_queries=1)
    assert json.loads(single.to_json())["mr1"] == {"mean": 0.5, "low": None, "high": None}

    table = format_table({"track": track, "segment 5s": single})
    lines = table.splitlines()
    assert len(lines) == 3
    assert lines[0].split() == ["queries", "MAP", "MR1", "NAR%", "Top1", "Top10"]
    assert lines[1].startswith("track ") and lines[2].startswith("segment 5s ")
    assert f"{track.map.mean:.3f} ±" in lines[1]
    assert len({len(line) for line in lines}) == 1  # aligned


def test_eval_result_needs_top1_and_top10():
    dist, labels = _toy_collection()
    with pytest.raises(ValueError, match="ks"):
        EvalResult.from_metrics(retrieval_metrics(dist, labels, labels, ks=(1, 5)))


def test_json_request_logs_carry_route_status_latency_and_request_id(live_server, tmp_path, caplog):
    import json
    import logging

    from refrain.service.settings import Settings

    from conftest import CKPT_A

    srv = live_server(Settings(data_dir=tmp_path / "data", model=str(CKPT_A), log_requests="json"))
    with caplog.at_level(logging.INFO, logger="refrain.requests"), srv.client() as c:
        r = c.get("/v1/tracks/missing", headers={"X-Request-ID": "req-42"})
        assert r.status_code == 404 and r.headers["x-request-id"] == "req-42"
        fresh = c.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
        assert len(fresh.headers["x-request-id"]) == 32  # refused, a new one given
        deadline = time.monotonic() + 5  # a line is written once its response has gone
        while True:
            lines = [
                json.loads(rec.getMessage())
                for rec in caplog.records
                if rec.name == "refrain.requests"
            ]
            routes = {line["route"] for line in lines}
            if routes >= {"/healthz", "/v1/tracks/{track_id:path}"}:
                break
            assert time.monotonic() < deadline, routes
            time.sleep(0.05)
    missing = next(line for line in lines if line["request_id"] == "req-42")
    assert missing["route"] == "/v1/tracks/{track_id:path}" and missing["status"] == 404
    assert missing["method"] == "GET" and missing["path"] == "/v1/tracks/missing"
    assert missing["latency_ms"] >= 0
    assert any(line["route"] == "/healthz" for line in lines)


def test_the_command_line_silences_library_chatter():
    import logging

    import pytest

    from refrain.service.cli import QUIET, main

    with pytest.raises(SystemExit):
        main(["-h"])
    assert all(logging.getLogger(name).level == logging.WARNING for name in QUIET)
