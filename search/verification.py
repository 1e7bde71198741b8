"""Alignment verification in search: the segment distance's best candidates re-ranked with
the Qmax alignment of chroma sequences, and where each returned track matches.

The reducer (`search.rank_tracks`) hands over its candidates closest first. The first
`candidates` of them that have a stored sequence (`TrackRecord.sequence`) are aligned with
the query in one pass (`refrain.model.align.plots`) on the tune chroma
(`refrain.model.sequence.TUNE`, the tune-salience network's), their order becomes the fusion's
(`refrain.search.fusion.Fusion`: minus the segment distance plus `weight` times Qmax per
query frame, less `expand` times the first track's own distance to each: `Fusion.expanded`),
and tracks further down keep their order after them. A candidate without a sequence (added
by an older version) takes the median Qmax, so it neither rises nor sinks for lack of one;
one whose sequence holds no tune chroma (stored by an older version) is aligned on the upper
chroma (`refrain.model.sequence.UPPER`), or on the full chroma when that is all it holds.
For the tracks returned, `locate` reads the query and reference ranges, the tempo ratio and
the key shift off alignment paths of the full chroma, starting from the blocks the scoring
pass already aligned where it aligned the full chroma.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from refrain.index import SegmentStore
from refrain.model import align
from refrain.model.sequence import SEQUENCE_RATE, TUNE, UPPER, decode_all
from refrain.search.fusion import Fusion

log = logging.getLogger(__name__)

_warned: set[str] = set()  # kinds of older sequences already logged


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
        upper: np.ndarray | None = None,
        tune: np.ndarray | None = None,
    ) -> None:
        self.fusion = fusion
        self.fine = fine
        ids = list(track_ids[: fusion.candidates])
        stored = store.sequences(ids)
        self.missing = len(ids) - len(stored)
        if self.missing:
            _warn_missing(self.missing, len(ids))
        self.refs: dict[str, np.ndarray] = {}
        uppers: dict[str, np.ndarray] = {}
        tunes: dict[str, np.ndarray] = {}
        for tid in ids:
            if tid in stored:
                self.refs[tid], u, t = decode_all(stored[tid])
                if t is not None and tune is not None:
                    tunes[tid] = t
                elif u is not None and upper is not None:
                    uppers[tid] = u
        # candidates scored on the upper chroma, and those (stored by an older version, or a
        # query without it) on the full chroma, whose blocks `locate` then starts from
        on_full = [tid for tid in self.refs if tid not in uppers and tid not in tunes]
        if on_full and upper is not None:
            _warn_full(len(on_full), len(ids))
        if uppers and tune is not None:
            _warn_upper(len(uppers), len(ids))
        self.column = {tid: c for c, tid in enumerate(on_full)}
        self.plot = align.plots(chroma, [self.refs[tid] for tid in on_full])
        qmax = dict(zip(on_full, self.plot.qmax().tolist(), strict=True))
        if upper is not None and uppers:
            scores = align.plots(upper, list(uppers.values()), UPPER).qmax()
            qmax |= dict(zip(uppers, scores.tolist(), strict=True))
        if tune is not None and tunes:
            scores = align.plots(tune, list(tunes.values()), TUNE).qmax()
            qmax |= dict(zip(tunes, scores.tolist(), strict=True))
        self.qmax = qmax
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
        aligned: list[tuple[np.ndarray, np.ndarray, int] | None] = []
        for tid, _ in todo:  # a block of the full chroma where the scoring aligned one
            c = self.column.get(tid)
            if c is None:
                aligned.append(None)
                continue
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


def _warn_once(kind: str, message: str, *args: object) -> None:
    """Log `message` the first time a search meets this `kind` of older sequence."""
    if kind not in _warned:
        _warned.add(kind)
        log.warning(message, *args)


def _warn_full(n: int, total: int) -> None:
    _warn_once(
        "full",
        "%d of %d search candidates hold only the full chroma (stored by an older "
        "version): they are aligned on it, which follows a tune less well than the upper "
        "chroma; rebuild the index with `refrain index build` to align every track on both",
        n,
        total,
    )


def _warn_upper(n: int, total: int) -> None:
    _warn_once(
        "upper",
        "%d of %d search candidates hold no tune chroma (stored by an older version): they "
        "are aligned on the upper chroma; rebuild the index with `refrain index build` to "
        "align every track on its tune",
        n,
        total,
    )


def _warn_missing(missing: int, total: int) -> None:
    _warn_once(
        "missing",
        "%d of %d search candidates have no stored chroma sequence (added by an older "
        "version): they are ranked by segment distance alone and reported without "
        "alignment; rebuild the index with `refrain index build` to verify every track",
        missing,
        total,
    )
