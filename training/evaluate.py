"""Version retrieval evaluation on a manifest of labelled tracks, as in the CLEWS paper.

Track level: every track is embedded whole and queries all the others (itself excluded);
a track pair is scored by a segment distance reduction (``bpwr-10``). Segment level: for
each query length tau, a clip of tau seconds cut at a seeded random offset of every track
queries the whole embeddings of all the other tracks, scored with ``min``. Both levels
report MAP, MR1, NAR and top-1/top-10 with 95% confidence intervals.

A `PairwiseScorer` (the Qmax baseline of `model.qmax`) may stand in for the `Embedder`: its
per-track features go through the same decoding and query clips, and it scores every
(query, candidate) pair itself in place of the segment reductions.

    from refrain.model import load_model
    from refrain.training.evaluate import evaluate, read_manifest
    results = evaluate(load_model(), read_manifest("test.csv"), query_seconds=(10,))
"""

from __future__ import annotations

import csv
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

from refrain.model.reduce import Reduction
from refrain.training.clips import distances, embed_all
from refrain.training.retrieval_metrics import EvalResult, retrieval_metrics

if TYPE_CHECKING:
    from refrain.model.config import ModelConfig
    from refrain.model.embedder import AudioInput

__all__ = [
    "EvalOptions",
    "Evaluation",
    "Item",
    "PairwiseScorer",
    "TrackEncoder",
    "evaluate",
    "evaluate_detailed",
    "read_manifest",
]

MANIFEST_COLUMNS = ("clique", "path")


# One evaluated level: (label, query item ids, query embeddings or features, reduction,
# query offsets in seconds or None)
Level = tuple[str, np.ndarray, list[np.ndarray], str, np.ndarray | None]


@dataclass(frozen=True)
class Item:
    """One track of an evaluation set."""

    clique: str  # the work this track is a version of; same clique = relevant
    path: Path | None = None  # audio file (None when the waveform or embedding is given)


def read_manifest(path: str | Path, split: str | None = None) -> list[Item]:
    """Read a CSV manifest with a header naming at least the columns ``clique`` and ``path``.

    With `split`, only rows whose ``split`` column equals it are read. Other columns are
    ignored. Relative paths are taken from the manifest's folder. Raises
    ValueError naming the line for a missing column, an empty field, a missing or repeated file.
    """
    path = Path(path)
    root = path.parent
    items: list[Item] = []
    seen: dict[Path, int] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        header = [name.strip() for name in reader.fieldnames or []]
        missing = [name for name in MANIFEST_COLUMNS if name not in header]
        if missing:
            raise ValueError(
                f"{path}, line 1: expected a header with columns {','.join(MANIFEST_COLUMNS)}, "
                f"got {','.join(header) or 'nothing'} (missing {', '.join(missing)})"
            )
        reader.fieldnames = header
        if split is not None and "split" not in header:
            raise ValueError(
                f"{path}: a split was asked for ({split!r}) but there is no split column"
            )
        for row in reader:
            line = reader.line_num
            if split is not None and (row.get("split") or "").strip() != split:
                continue
            clique = (row.get("clique") or "").strip()
            rel = (row.get("path") or "").strip()
            if not clique:
                raise ValueError(f"{path}, line {line}: empty clique")
            if not rel:
                raise ValueError(f"{path}, line {line}: empty path")
            audio = root / rel
            if not audio.is_file():
                raise ValueError(f"{path}, line {line}: no such file: {audio}")
            key = audio.resolve()
            if key in seen:
                raise ValueError(
                    f"{path}, line {line}: {rel} is already listed on line {seen[key]}"
                )
            seen[key] = line
            items.append(Item(clique, audio))
    if not items:
        raise ValueError(f"{path}: expected at least one track, got none")
    return items


class TrackEncoder(Protocol):
    """What an evaluation needs of a model: an `Embedder`, or a stand-in with its interface
    (the chroma baseline, a `PairwiseScorer`) whose ``embed_many`` gives per-track features."""

    @property
    def sample_rate(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def identity(self) -> Any: ...  # with a ``to_dict``

    @property
    def config(self) -> ModelConfig: ...

    def waveform(self, audio: AudioInput) -> torch.Tensor: ...

    def embed_many(
        self, items: Sequence[AudioInput], hop: float = ..., batch_size: int = ...
    ) -> Sequence[np.ndarray | None]: ...


@runtime_checkable
class PairwiseScorer(Protocol):
    """Stands in for an `Embedder` when tracks are compared pair by pair, not by embeddings.

    Besides the `Embedder`'s ``sample_rate``, ``waveform``, ``identity`` and ``embed_many``
    (which returns the scorer's own per-track features), it has a ``name``, which labels the
    levels (``track (qmax)``), and ``distances``, which scores groups of query features
    against all candidates at once and reports what that cost (an object with ``to_dict``).
    """

    name: str

    def distances(
        self,
        queries: Sequence[Sequence[np.ndarray]],
        cands: Sequence[np.ndarray],
        progress: bool = False,
    ) -> tuple[list[np.ndarray], Any]: ...


@dataclass(frozen=True)
class EvalOptions:
    """How an evaluation is run; the defaults follow the paper."""

    reduction: str = "bpwr-10"  # track-level segment distance reduction
    segment_reduction: str = "min"  # reduction of a segment query against a whole track
    query_seconds: tuple[float, ...] = (5.0, 10.0, 20.0, 30.0)  # segment query lengths
    hop: float = 5.0  # seconds between segments, for tracks and for queries
    queries_per_track: int = 1  # segment queries cut from every track, per query length
    seed: int = 0  # seed of the segment query offsets
    max_seconds: float | None = 600.0  # tracks are cut to their start (the reference's maxlen)
    batch_size: int = 32  # segments per network call
    # alignment verification (`refrain.search.fusion`): also report every level with the model's
    # `verify` nearest tracks re-ranked by Qmax fused with the distance (0: off)
    verify: int = 0
    verify_weight: float = 2.4  # refrain.search.fusion.Fusion's
    verify_expand: float = 0.5  # expansion with the first candidate (Fusion's)
    verify_tune: bool = True  # align the tune chroma (model.sequence.TUNE), else the upper
    # also report every level re-ranked with each (candidates, weight) of `refrain.search.fusion`'s
    # sweep, candidates up to `verify` (the data to choose them on validation queries)
    verify_sweep: bool = False

    def __post_init__(self) -> None:
        Reduction.parse(self.reduction)
        Reduction.parse(self.segment_reduction)
        taus = tuple(float(t) for t in self.query_seconds)
        if any(not (math.isfinite(t) and t > 0) for t in taus) or len(set(taus)) != len(taus):
            raise ValueError(
                f"expected distinct positive query lengths in seconds, got {self.query_seconds!r}"
            )
        object.__setattr__(self, "query_seconds", taus)
        if not (math.isfinite(self.hop) and self.hop > 0):
            raise ValueError(f"expected a positive hop in seconds, got {self.hop!r}")
        for name in ("queries_per_track", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)!r}")
        if self.verify:
            from refrain.search.fusion import Fusion

            Fusion(self.verify, self.verify_weight, self.verify_expand)  # raises on bad values
        elif self.verify_sweep:
            raise ValueError("verify_sweep needs verify (its largest number of candidates)")
        if self.seed < 0:
            raise ValueError(f"expected a non-negative seed, got {self.seed!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"expected a positive max_seconds or None, got {self.max_seconds!r}")

    @property
    def track_label(self) -> str:
        return f"track ({self.reduction})"

    def segment_label(self, tau: float, scorer: str | None = None) -> str:
        return f"segment {tau:g} s ({scorer or self.segment_reduction})"


@dataclass
class Evaluation:
    """Everything one evaluation produced."""

    options: EvalOptions
    results: dict[str, EvalResult]  # one row per level, labelled as in the table
    per_query: dict[str, dict[str, np.ndarray]]  # per level: arrays over evaluated queries
    items: list[Item]
    skipped: list[tuple[int, str]]  # (item index, error) of tracks that could not be decoded
    model_identity: dict | None = None
    wall_s: float = 0.0
    pairwise: dict | None = None  # a pairwise scorer's name and cost (pairs, seconds, ...)
    verification: dict | None = None  # alignment verification's fusion and cost, if run
    n_tracks: int = field(init=False)  # tracks evaluated
    n_cliques: int = field(init=False)  # distinct cliques among them

    def __post_init__(self) -> None:
        dropped = {i for i, _ in self.skipped}
        kept = [item for i, item in enumerate(self.items) if i not in dropped]
        self.n_tracks = len(kept)
        self.n_cliques = len({item.clique for item in kept})

    @property
    def n_without_relevant(self) -> int:
        """Queries (of all levels) left without any relevant candidate, hence not scored."""
        return sum(result.n_skipped for result in self.results.values())

    def summary(self) -> str:
        return (
            f"{self.n_tracks} tracks, {self.n_cliques} cliques, {len(self.skipped)} skipped "
            f"files, {self.n_without_relevant} queries with no relevant candidate"
        )

    def to_dict(self, per_query: bool = False) -> dict:
        """Plain JSON-ready dict: settings, counts, results; per-query arrays if asked."""
        settings = dataclasses.asdict(self.options)
        if self.pairwise is not None:  # the scorer replaces both reductions
            settings.update(
                reduction=self.pairwise["scorer"], segment_reduction=self.pairwise["scorer"]
            )
        out = {
            "settings": {"model": self.model_identity, **settings},
            "counts": {
                "tracks": self.n_tracks,
                "cliques": self.n_cliques,
                "skipped_files": len(self.skipped),
                "queries_without_relevant": self.n_without_relevant,
            },
            "results": {label: result.to_dict() for label, result in self.results.items()},
            "skipped": [
                {"index": i, "path": _path_str(self.items[i]), "error": err}
                for i, err in self.skipped
            ],
            "wall_s": self.wall_s,
        }
        if self.pairwise is not None:
            out["pairwise"] = self.pairwise
        if self.verification is not None:
            out["verification"] = self.verification
        if per_query:
            out["tracks"] = [{"clique": it.clique, "path": _path_str(it)} for it in self.items]
            out["per_query"] = {
                label: {key: values.tolist() for key, values in arrays.items()}
                for label, arrays in self.per_query.items()
            }
        return out


def _path_str(item: Item) -> str | None:
    return None if item.path is None else str(item.path)


def _options(options: EvalOptions | None, overrides: dict) -> EvalOptions:
    known = {f.name for f in dataclasses.fields(EvalOptions)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown evaluation options {unknown}; expected {sorted(known)}")
    return dataclasses.replace(options or EvalOptions(), **overrides)


def evaluate(
    model: TrackEncoder | None,
    items: Sequence[Item],
    options: EvalOptions | None = None,
    *,
    embeddings: Sequence[np.ndarray] | None = None,
    waveforms: Sequence[np.ndarray | torch.Tensor] | None = None,
    progress: bool = False,
    **overrides: Any,
) -> dict[str, EvalResult]:
    """Track- and segment-level results, e.g. ``evaluate(model, items, query_seconds=(10,))``.

    Keyword overrides are ``EvalOptions`` fields. See ``evaluate_detailed`` for the arguments.
    """
    return evaluate_detailed(
        model,
        items,
        options,
        embeddings=embeddings,
        waveforms=waveforms,
        progress=progress,
        **overrides,
    ).results


def evaluate_detailed(
    model: TrackEncoder | None,
    items: Sequence[Item],
    options: EvalOptions | None = None,
    *,
    embeddings: Sequence[np.ndarray] | None = None,
    waveforms: Sequence[np.ndarray | torch.Tensor] | None = None,
    progress: bool = False,
    **overrides: Any,
) -> Evaluation:
    """Run the protocol on `items` with an `Embedder` and return results and per-query data.

    `embeddings` (one (S, D) array per item, at the options' hop) replace the whole-track
    embedding; `waveforms` (mono at the model's sample rate, one per item) replace decoding.
    The model may be None when embeddings are given and there are no segment queries.
    Items that cannot be decoded are left out of both sides and listed in ``skipped``.
    """
    start = time.perf_counter()
    opts = _options(options, overrides)
    items = list(items)
    for name, given in (("embeddings", embeddings), ("waveforms", waveforms)):
        if given is not None and len(given) != len(items):
            raise ValueError(f"expected {len(items)} {name} (one per item), got {len(given)}")
    need_audio = embeddings is None or bool(opts.query_seconds)
    if need_audio and model is None:
        raise ValueError("a model is needed to embed tracks or segment queries")
    if need_audio:
        assert model is not None  # checked above
        whole, queries, skipped = embed_all(model, items, opts, embeddings, waveforms, progress)
    else:
        assert embeddings is not None  # given when no audio is needed
        whole, queries, skipped = [np.asarray(z, dtype=np.float32) for z in embeddings], {}, []
    kept = [i for i in range(len(items)) if whole[i] is not None]
    labels = np.unique([item.clique for item in items], return_inverse=True)[1]
    n_cliques = len(np.unique(labels[kept]))
    if n_cliques == len(kept):
        raise ValueError(
            f"expected at least one clique with two or more usable tracks, got {len(kept)} "
            f"tracks in {n_cliques} cliques"
        )
    ids = np.array(kept)
    cands = [z for z in whole if z is not None]  # those of `kept`
    device = "cpu" if model is None else model.device
    pairwise_model = model if isinstance(model, PairwiseScorer) else None
    scorer = None if pairwise_model is None else pairwise_model.name

    # (label, query item ids, query embeddings or features, reduction, offsets or None)
    levels: list[Level] = [
        (
            opts.track_label if scorer is None else f"track ({scorer})",
            ids,
            cands,
            opts.reduction,
            None,
        )
    ]
    for tau in opts.query_seconds:
        tau_ids, tau_offsets, tau_z = zip(*queries[tau], strict=False)
        levels.append(
            (
                opts.segment_label(tau, scorer),
                np.array(tau_ids),
                list(tau_z),
                opts.segment_reduction,
                np.array(tau_offsets),
            )
        )
    pairwise = verification = None
    if pairwise_model is None:
        dists = [
            distances(qz, cands, reduction, device, progress, label)
            for label, _, qz, reduction, _ in levels
        ]
    else:
        dists, cost = pairwise_model.distances(
            [level[2] for level in levels], cands, progress=progress
        )
        pairwise = {"scorer": scorer, **cost.to_dict()}

    if scorer is None and opts.verify:
        from refrain.training.verified import verified

        assert model is not None  # verification reads its config
        fused, sweep, cost = verified(model, items, opts, waveforms, kept, levels, dists, progress)
        swept = [
            ((f"{level[0]} +verify {label}", *level[1:]), dist)
            for label, per_level in sweep.items()
            for level, dist in zip(levels, per_level, strict=True)
        ]
        levels = levels + [(f"{level[0]} +verify", *level[1:]) for level in levels]
        dists = dists + fused
        levels, dists = levels + [s[0] for s in swept], dists + [s[1] for s in swept]
        verification = cost

    results, per_query = {}, {}
    for (label, qids, _, _, offsets), dist in zip(levels, dists, strict=True):
        metrics = retrieval_metrics(dist, labels[qids], labels[ids], qids, ids)
        nearest = ids[np.where(qids[:, None] == ids[None, :], np.inf, dist).argmin(1)]
        index = metrics["per_query"].pop("index")
        arrays = {"track": qids[index], "nearest": nearest[index]}
        if offsets is not None:
            arrays["offset_s"] = offsets[index]
        results[label] = EvalResult.from_metrics(metrics)
        per_query[label] = arrays | metrics["per_query"]
    identity = None if model is None else model.identity.to_dict()
    return Evaluation(
        options=opts,
        results=results,
        per_query=per_query,
        items=items,
        skipped=skipped,
        model_identity=identity,
        wall_s=time.perf_counter() - start,
        pairwise=pairwise,
        verification=verification,
    )
