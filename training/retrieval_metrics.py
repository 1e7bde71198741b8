"""Retrieval metrics for version matching: MAP, MR1, NAR and top-k hit rate.

Every metric ranks candidates by ascending distance with a stable sort, so candidates at
equal distance keep their input order (the reference uses an unstable sort, which leaves the
order of ties unspecified). +inf distances are allowed and rank last; NaN is rejected.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "Estimate",
    "EvalResult",
    "average_precision",
    "format_table",
    "mean_ci95",
    "normalized_average_rank",
    "rank_of_first_correct",
    "retrieval_metrics",
    "top_k_hit",
]

# Upper bound on the entries of one block of query rows sorted at once.
_MAX_BLOCK_ELEMENTS = 1 << 22


def _ranked(distances: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Relevance (float 0/1) of each row's candidates in ascending distance order: (R, C)."""
    order = np.argsort(distances, axis=-1, kind="stable")
    return np.take_along_axis(relevant, order, axis=-1).astype(np.float64)


def _row_metrics(ranked: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Average precision, rank of first correct (1-based) and NAR (%) of each ranked row."""
    n_rel = ranked.sum(-1)
    hits = np.cumsum(ranked, axis=-1)
    precision = hits / np.arange(1, ranked.shape[-1] + 1)
    ap = (precision * ranked).sum(-1) / n_rel
    rank1 = ranked.argmax(-1) + 1
    # NAR: for each relevant item, the fraction of all irrelevant items ranked before it.
    misses = 1.0 - ranked
    before = np.cumsum(misses, axis=-1) / np.maximum(misses.sum(-1, keepdims=True), 1.0)
    nar = 100.0 * (before * ranked).sum(-1) / n_rel
    return ap, rank1, nar


def _check_one(distances: ArrayLike, relevant: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(distances, dtype=np.float64)
    r = np.asarray(relevant)
    if d.ndim != 1 or r.shape != d.shape:
        raise ValueError(
            f"expected 1-D distances and relevance of the same length, "
            f"got shapes {d.shape} and {r.shape}"
        )
    if r.dtype != np.bool_:
        raise ValueError(f"expected boolean relevance, got dtype {r.dtype}")
    if np.isnan(d).any():
        raise ValueError("distances contain NaN")
    if not r.any():
        raise ValueError("at least one candidate must be relevant")
    return d[None], r[None]


def average_precision(distances: ArrayLike, relevant: ArrayLike) -> float:
    """Average precision of the ranking by ascending distance (1 = every relevant item first)."""
    return float(_row_metrics(_ranked(*_check_one(distances, relevant)))[0][0])


def rank_of_first_correct(distances: ArrayLike, relevant: ArrayLike) -> int:
    """1-based rank of the first relevant candidate."""
    return int(_row_metrics(_ranked(*_check_one(distances, relevant)))[1][0])


def normalized_average_rank(distances: ArrayLike, relevant: ArrayLike) -> float:
    """Normalised average rank in percent, 0 = perfect, 100 = every relevant item last.

    For each relevant item, the fraction of the irrelevant items ranked before it, averaged
    over relevant items (the reference's unbiased ``rank_percentile``). With no irrelevant
    candidate at all the ranking is perfect and the value is 0.
    """
    return float(_row_metrics(_ranked(*_check_one(distances, relevant)))[2][0])


def top_k_hit(distances: ArrayLike, relevant: ArrayLike, k: int) -> bool:
    """Whether a relevant candidate is among the k closest."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return rank_of_first_correct(distances, relevant) <= k


def retrieval_metrics(
    dist_matrix: ArrayLike,
    query_labels: ArrayLike,
    cand_labels: ArrayLike,
    query_ids: ArrayLike | None = None,
    cand_ids: ArrayLike | None = None,
    ks: Sequence[int] = (1, 10),
) -> dict[str, Any]:
    """Metrics of every query of a (Q, C) distance matrix; relevant = same label (work).

    When query_ids and cand_ids are given, a candidate with the query's own id is excluded
    as the reference does: its distance becomes +inf and it is not relevant. It thus stays in
    the list as the last irrelevant item, which leaves MAP, MR1 and top-k as if it were
    removed but scales NAR by n_irrelevant / (n_irrelevant + 1) (negligible for large
    catalogs; kept so that NAR compares with published numbers). Queries left with no
    relevant candidate are skipped and counted.

    Returns ``{"per_query": {"index", "ap", "rank1", "nar", "top{k}"...}: arrays over the
    evaluated queries, "MAP", "MR1", "NAR", "top{k}"...: their means, "n_queries",
    "n_skipped"}``.
    """
    dist = np.asarray(dist_matrix, dtype=np.float64)
    qlab, clab = np.asarray(query_labels), np.asarray(cand_labels)
    if dist.ndim != 2 or qlab.shape != (dist.shape[0],) or clab.shape != (dist.shape[1],):
        raise ValueError(
            f"expected a (Q, C) distance matrix with Q query and C candidate "
            f"labels, got {dist.shape}, {qlab.shape} and {clab.shape}"
        )
    if (query_ids is None) != (cand_ids is None):
        raise ValueError("give both query_ids and cand_ids, or neither")
    if query_ids is not None:
        qid, cid = np.asarray(query_ids), np.asarray(cand_ids)
        if qid.shape != qlab.shape or cid.shape != clab.shape:
            raise ValueError(
                f"expected {qlab.shape[0]} query ids and {clab.shape[0]} "
                f"candidate ids, got {qid.shape} and {cid.shape}"
            )
    if np.isnan(dist).any():
        raise ValueError("distances contain NaN")
    ks = tuple(ks)
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be integers >= 1, got {ks!r}")

    n_q, n_c = dist.shape
    rows = max(1, _MAX_BLOCK_ELEMENTS // max(1, n_c))
    parts: list[np.ndarray] = []  # the evaluated queries' rows, block by block
    ap, rank1, nar = [], [], []
    for start in range(0, n_q, rows):
        d = dist[start : start + rows]
        rel = qlab[start : start + rows, None] == clab[None, :]
        if query_ids is not None:
            own = qid[start : start + rows, None] == cid[None, :]
            d = np.where(own, np.inf, d)
            rel &= ~own
        keep = rel.any(-1)
        if not keep.any():
            continue
        a, r1, n = _row_metrics(_ranked(d[keep], rel[keep]))
        parts.append(np.flatnonzero(keep) + start)
        ap.append(a)
        rank1.append(r1)
        nar.append(n)
    if not parts:
        raise ValueError(f"none of the {n_q} queries has a relevant candidate")
    index = np.concatenate(parts)
    per_query: dict[str, np.ndarray] = {
        "index": index,
        "ap": np.concatenate(ap),
        "rank1": np.concatenate(rank1),
        "nar": np.concatenate(nar),
    }
    for k in ks:
        per_query[f"top{k}"] = (per_query["rank1"] <= k).astype(np.float64)
    out: dict[str, Any] = {
        "per_query": per_query,
        "MAP": float(per_query["ap"].mean()),
        "MR1": float(per_query["rank1"].mean()),
        "NAR": float(per_query["nar"].mean()),
    }
    for k in ks:
        out[f"top{k}"] = float(per_query[f"top{k}"].mean())
    out["n_queries"] = len(index)
    out["n_skipped"] = n_q - len(index)
    return out


def mean_ci95(values: ArrayLike) -> tuple[float, float, float]:
    """Mean and 95% confidence interval (mean, low, high) of a sample.

    Normal approximation: mean +- 1.96 * s / sqrt(n), with s the sample standard deviation
    (ddof=1). With a single value the interval is undefined and its bounds are NaN.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if len(x) == 0:
        raise ValueError("expected at least one value")
    mean = float(x.mean())
    if len(x) == 1:
        return mean, math.nan, math.nan
    half = 1.96 * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% confidence interval."""

    mean: float
    low: float
    high: float

    @classmethod
    def of(cls, values: ArrayLike) -> Estimate:
        return cls(*mean_ci95(values))


@dataclass(frozen=True)
class EvalResult:
    """Summary of one evaluation (one level: track, or segment queries of a given length)."""

    map: Estimate  # mean average precision
    mr1: Estimate  # mean rank of the first correct candidate (1 = best)
    nar: Estimate  # normalised average rank, % (0 = best)
    top1: Estimate  # fraction of queries whose closest candidate is relevant
    top10: Estimate  # fraction with a relevant candidate among the 10 closest
    n_queries: int  # queries evaluated
    n_skipped: int = 0  # queries without any relevant candidate

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any]) -> EvalResult:
        """Build from the output of ``retrieval_metrics`` (which must include k = 1 and 10)."""
        per_query = metrics["per_query"]
        missing = {"top1", "top10"} - per_query.keys()
        if missing:
            raise ValueError(f"metrics lack {sorted(missing)}; compute them with ks=(1, 10)")
        return cls(
            map=Estimate.of(per_query["ap"]),
            mr1=Estimate.of(per_query["rank1"]),
            nar=Estimate.of(per_query["nar"]),
            top1=Estimate.of(per_query["top1"]),
            top10=Estimate.of(per_query["top10"]),
            n_queries=int(metrics["n_queries"]),
            n_skipped=int(metrics["n_skipped"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict; undefined interval bounds (NaN) become None."""

        def clean(value: Any) -> Any:
            if isinstance(value, dict):
                return {key: clean(v) for key, v in value.items()}
            return None if isinstance(value, float) and math.isnan(value) else value

        return clean(asdict(self))

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)


_COLUMNS = (
    # header, attribute, digits
    ("MAP", "map", 3),
    ("MR1", "mr1", 1),
    ("NAR%", "nar", 2),
    ("Top1", "top1", 3),
    ("Top10", "top10", 3),
)


def _cell(estimate: Estimate, digits: int) -> str:
    if math.isnan(estimate.low):
        return f"{estimate.mean:.{digits}f}"
    half = (estimate.high - estimate.low) / 2
    return f"{estimate.mean:.{digits}f} ± {half:.{digits}f}"


def format_table(results: dict[str, EvalResult]) -> str:
    """An aligned text table, one row per result ("track", "segment 5s", ...), mean ± 95% CI."""
    header = ["", "queries"] + [name for name, _, _ in _COLUMNS]
    body = [
        [label, str(result.n_queries)]
        + [_cell(getattr(result, attr), digits) for _, attr, digits in _COLUMNS]
        for label, result in results.items()
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = []
    for row in [header, *body]:
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=False)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
