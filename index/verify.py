"""Alignment verification in search: the segment distance's best candidates re-ranked with
the Qmax alignment of chroma sequences, and where each returned track matches.

The reducer (`search.rank_tracks`) hands over its candidates closest first. The first
`candidates` of them that have a stored sequence (`TrackRecord.sequence`) are aligned with
the query in one pass (`refrain.model.align.plots`), their order becomes the fusion's
(`refrain.model.verify.Fusion`: minus the segment distance plus `weight` times Qmax per
query frame, less `expand` times the first track's own distance to each: `Fusion.expanded`),
and tracks further down keep their order after them. A candidate
without a sequence (added by an older version) takes the median Qmax, so it neither rises
nor sinks for lack of one. For the tracks returned, `locate` reads the query and reference
ranges, the tempo ratio and the key shift off the alignment paths, starting from the blocks
this pass already aligned.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from refrain.model import align
from refrain.model.sequence import SEQUENCE_RATE, decode
from refrain.model.verify import Fusion

from .segment_store import SegmentStore

log = logging.getLogger(__name__)

_warned_missing = False


class Verification:
    """The alignments of one query against its shortlisted candidates."""

    def __init__(
        self,
        store: SegmentStore,
        track_ids: Sequence[str],
        distances: Sequence[float],
        chroma: np.ndarray,
        fine: np.ndarray | None,
        fusion: Fusion,
    ) -> None:
        self.fusion = fusion
        self.fine = fine
        ids = list(track_ids[: fusion.candidates])
        stored = store.sequences(ids)
        self.missing = len(ids) - len(stored)
        if self.missing:
            _warn_missing(self.missing, len(ids))
        self.refs = {tid: decode(stored[tid]) for tid in ids if tid in stored}
        self.column = {tid: c for c, tid in enumerate(self.refs)}
        self.plot = align.plots(chroma, list(self.refs.values()))
        qmax = self.plot.qmax()
        self.qmax = {tid: float(qmax[c]) for tid, c in self.column.items()}
        q = np.array([self.qmax.get(tid, np.nan) for tid in ids])
        # each aligned candidate's standing among the others, for the fused calibration
        self.relative = dict(zip(ids, fusion.standard_scores(q).tolist(), strict=True))
        self.ids = ids
        self.fused = fusion.fuse(
            np.asarray(distances[: len(ids)], dtype=np.float64), q, len(chroma)
        )

    @property
    def order(self) -> list[str]:
        """The aligned candidates, best fused score first."""
        return [self.ids[i] for i in np.argsort(-self.fused, kind="stable")]

    def expand(self, from_first: Sequence[float]) -> None:
        """The head re-ordered after expansion with its first track (`Fusion.expanded`):
        `from_first[i]` is the whole-track segment distance from the first track in the
        fused order to `ids[i]`."""
        self.fused = self.fusion.expanded(self.fused, np.asarray(from_first, dtype=np.float64))

    @property
    def ran(self) -> bool:
        """False when none of the candidates had a sequence: the segment order stands."""
        return bool(self.refs)

    def reorder(self, track_ids: Sequence[str]) -> list[str]:
        """`track_ids` (the reducer's order) with the verified head in the fused order."""
        head = set(self.order)
        return self.order + [t for t in track_ids if t not in head]

    def locate(
        self, tracks: Sequence[tuple[str, float | None]], max_matches: int, query_s: float
    ) -> dict[str, list[align.Alignment]]:
        """Where the query matches each of `tracks` ((track id, duration) pairs) that was
        aligned, best first; all of them in one pass."""
        todo = [(tid, s) for tid, s in tracks if tid in self.refs]
        aligned = []
        for tid, _ in todo:
            c = self.column[tid]
            score, rec = self.plot.block(c)
            aligned.append((score, rec, int(self.plot.shifts[c])))
        found = align.locate(
            self.plot.query,
            self.fine,
            [self.refs[tid] for tid, _ in todo],
            max_matches,
            SEQUENCE_RATE,
            query_s,
            [s for _, s in todo],
            self.plot.params,
            aligned,
        )
        return {tid: m for (tid, _), m in zip(todo, found, strict=True)}


def _warn_missing(missing: int, total: int) -> None:
    global _warned_missing
    if not _warned_missing:
        _warned_missing = True
        log.warning(
            "%d of %d search candidates have no stored chroma sequence (added by an older "
            "version): they are ranked by segment distance alone and reported without "
            "alignment; rebuild the index with `refrain index build` to verify every track",
            missing,
            total,
        )
