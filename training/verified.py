"""Verification in the evaluation: each query level's shortlist re-ranked by the service's
fusion (`refrain.search.fusion.Fusion`) of the segment distance and the Qmax alignment, and
the sweeps that choose the fusion's settings on validation works (`--verify-sweep`,
`fit_fusion`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from refrain.search.fusion import Fusion
from refrain.training.clips import embed_all
from refrain.training.evaluate import EvalOptions, Item, Level, TrackEncoder
from refrain.training.retrieval_metrics import retrieval_metrics

WEIGHTS = (0.0, 0.4, 0.8, 1.2, 1.6, 2.0, 2.4, 3.2, 4.8, 6.4)  # searched by `fit_fusion`
# expansion weights `refrain evaluate --verify-sweep` tries
EXPANSIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
SWEEP_CANDIDATES = (10, 20, 50, 100, 200)  # shortlist sizes `refrain evaluate --verify-sweep` tries


def fit_fusion(
    dist: np.ndarray,
    qmax: Sequence[np.ndarray],
    shortlist: Sequence[np.ndarray],
    frames: Sequence[int],
    query_labels: np.ndarray,
    cand_labels: np.ndarray,
    query_ids: np.ndarray | None = None,
    cand_ids: np.ndarray | None = None,
    candidates: int = 100,
    weights: Sequence[float] = WEIGHTS,
) -> tuple[Fusion, dict[float, float]]:
    """The weight with the best MAP on these (validation) queries, and MAP per weight
    (without expansion)."""
    scores = {}
    for w in weights:
        fused = Fusion(candidates, w, 0.0).rerank(dist, qmax, shortlist, frames)
        scores[w] = retrieval_metrics(fused, query_labels, cand_labels, query_ids, cand_ids)["MAP"]
    best = max(scores, key=lambda w: (scores[w], -w))
    return Fusion(candidates, best, 0.0), scores


def verified(
    model: TrackEncoder,
    items: Sequence[Item],
    opts: EvalOptions,
    waveforms: Sequence[np.ndarray | torch.Tensor] | None,
    kept: list[int],
    levels: Sequence[Level],
    dists: Sequence[np.ndarray],
    progress: bool,
) -> tuple[list[np.ndarray], dict[str, list[np.ndarray]], dict[str, Any]]:
    """Each level's distances with its shortlists re-ranked by `refrain.search.fusion.Fusion`: the
    tune chroma (`model.sequence.TUNE`; the upper chroma, `UPPER`, without `verify_tune`) of
    the same tracks and clips (same draws), Qmax of
    the shortlisted pairs only;
    expansion reads the candidates' distances to each other off the whole-track level.
    With `verify_sweep`, also each (candidates, weight) of the sweep's re-ranking per level
    at the options' expansion ("CxW"), and each expansion weight at the options' candidates
    and weight ("CxW+E"), from the same Qmax scores (a shortlist of fewer candidates is a
    prefix of the longest)."""
    from refrain.model.qmax import QmaxScorer, shortlist_qmax
    from refrain.model.sequence import TUNE, UPPER, decode, encode

    fusion = Fusion(opts.verify, opts.verify_weight, opts.verify_expand)
    # the chroma verification aligns
    qmax_scorer = QmaxScorer(TUNE if opts.verify_tune else UPPER, config=model.config)
    whole, queries, _ = embed_all(qmax_scorer, items, opts, None, waveforms, progress)

    def quantised(z: np.ndarray | None) -> np.ndarray:
        """Chroma quantised like the sequences the service stores (`model.sequence`)."""
        assert z is not None, "chroma of a decoded track or clip"
        return decode(encode(z))

    # by item; the tracks that could not be decoded are left out, as from `kept`
    stored = {i: quantised(z) for i, z in enumerate(whole) if z is not None}
    cands = [stored[i] for i in kept]
    between = dists[0]  # the whole-track level: every kept track against every other, in order
    grid = {
        f"{c}x{w:g}": Fusion(c, w, opts.verify_expand)
        for c in sorted({c for c in SWEEP_CANDIDATES if c < opts.verify} | {opts.verify})
        for w in WEIGHTS
    }
    grid |= {
        f"{opts.verify}x{opts.verify_weight:g}+{e:g}": Fusion(opts.verify, opts.verify_weight, e)
        for e in EXPANSIONS
    }
    sweep: dict[str, list[np.ndarray]] = {}
    if opts.verify_sweep:
        sweep = {label: [] for label in grid}
    fused, pairs, wall, cpu = [], 0, 0.0, 0.0
    for (_, qids, *_rest), dist, tau in zip(
        levels, dists, (None, *opts.query_seconds), strict=True
    ):
        chroma = (
            [stored[i] for i in qids] if tau is None else [quantised(z) for _, _, z in queries[tau]]
        )
        masked = np.where(qids[:, None] == np.array(kept)[None, :], np.inf, dist)
        shortlist = fusion.shortlist(masked)
        qmax, cost = shortlist_qmax(chroma, cands, shortlist, qmax_scorer.params, progress=progress)
        frames = [len(c) for c in chroma]
        fused.append(fusion.rerank(dist, qmax, shortlist, frames, between))
        for label, out in sweep.items():
            c = grid[label].candidates
            short = [s[:c] for s in shortlist]
            out.append(grid[label].rerank(dist, [q[:c] for q in qmax], short, frames, between))
        pairs, wall, cpu = pairs + cost.pairs, wall + cost.wall_s, cpu + cost.cpu_s
    total = {
        "pairs": pairs,
        "wall_s": wall,
        "cpu_s": cpu,
        "workers": 1,
        "ms_per_pair": 1000 * wall / max(pairs, 1),
        "cpu_ms_per_pair": 1000 * cpu / max(pairs, 1),
        **fusion.to_dict(),
    }
    return fused, sweep, total
