"""Ranking: a query's segment embeddings against the store's, turned into track-level answers.

    from refrain.search import SearchOptions, rank_tracks

`ranking` gathers candidate tracks from each query segment's nearest neighbours in a
`refrain.index.SegmentStore`, reduces segment distances to track distances
(`refrain.model.reduce`) and, with verification on, re-ranks the nearest candidates by fusing
the distance with a chroma alignment (`fusion`, `verification`, `refrain.model.align`), and
reads the aligned tune of the tracks located (`tune`). The store stores; this package ranks;
neither knows HTTP.
"""

from refrain.search.fusion import Fusion
from refrain.search.ranking import (
    QuerySegments,
    SearchOptions,
    TrackHit,
    default_reduction,
    exhaustive_rank,
    key_shifts,
    rank_tracks,
)
from refrain.search.tune import AlignedTune, aligned_tune
from refrain.search.verification import Verification

__all__ = [
    "AlignedTune",
    "Fusion",
    "QuerySegments",
    "SearchOptions",
    "TrackHit",
    "Verification",
    "aligned_tune",
    "default_reduction",
    "exhaustive_rank",
    "key_shifts",
    "rank_tracks",
]
