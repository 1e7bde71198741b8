"""The evaluation through the service's own search: `refrain evaluate --served`.

The exhaustive evaluator (`refrain.training.evaluate`) scores every query against every track
with the segment reductions and re-ranks the nearest with verification; the service answers
a search from a FAISS index (per-segment nearest neighbours, candidates, the reduction its
query length selects, verification as served). This module runs the same tracks and clips
through the service's path so that the two can be compared side by side:

- a real index in a temporary folder, each track added by `Engine.add_reference` (decoded,
  embedded at the reference hop, stored with its chroma sequence) with the service's
  settings (`Settings()`: the environment's `REFRAIN_*` or the defaults);
- each track whole, and each clip (the evaluator's seeded offsets and lengths,
  `refrain.training.clips.query_draws`), searched with `Engine.search`, with and without
  verification; the query's own track is taken out of the index for its queries (deleted,
  then stored again with the same vectors and sequence), as the evaluator leaves it out;
- every search asks for the whole catalog (up to `Settings.max_top_k`); tracks the search
  does not return rank last, and the metrics are `refrain.training.retrieval_metrics`'.

Audio is handed to the engine as float WAV at the model's rate, cut like the evaluator's
tracks (`EvalOptions.max_seconds`), so both paths see the same samples. A whole track longer
than the service's `max_query_s` is searched all the same (the limit is raised to the
longest track for this run).
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

from refrain.model.audio import AudioDecodeError
from refrain.model.embedder import Embedder
from refrain.service.errors import RefrainError
from refrain.training.clips import clip_start, query_draws
from refrain.training.evaluate import EvalOptions, Item
from refrain.training.retrieval_metrics import EvalResult, retrieval_metrics

if TYPE_CHECKING:
    from refrain.service.settings import Settings

log = logging.getLogger(__name__)

SERVED = "served"  # suffix of the served levels' labels


@dataclass
class ServedEvaluation:
    """The served path's results, labelled like the evaluator's levels with "(served)"."""

    results: dict[str, EvalResult]
    settings: dict  # the search settings in force
    unranked: dict[str, float] = field(default_factory=dict)  # per level: mean tracks not returned
    refused: dict[str, int] = field(default_factory=dict)  # per level: queries the service refused
    skipped: list[tuple[int, str]] = field(default_factory=list)
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return {
            "settings": self.settings,
            "results": {label: r.to_dict() for label, r in self.results.items()},
            "unranked": self.unranked,
            "refused": self.refused,
            "skipped": [{"index": i, "error": e} for i, e in self.skipped],
            "wall_s": self.wall_s,
        }


def wav_bytes(wave: np.ndarray, sample_rate: int) -> bytes:
    """A float WAV of `wave`: decodes to the same samples at the model's rate."""
    buf = io.BytesIO()
    sf.write(buf, np.asarray(wave, dtype=np.float32), sample_rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def level_labels(opts: EvalOptions) -> list[str]:
    """The served levels' labels, in the evaluator's order (track, then each query length):
    the reduction is the one the search chooses by the query's length."""
    return [f"track ({SERVED})"] + [opts.segment_label(tau, SERVED) for tau in opts.query_seconds]


def side_by_side(
    opts: EvalOptions, exhaustive: dict[str, EvalResult], served: dict[str, EvalResult]
) -> str:
    """MAP per level, evaluated and served, with and without verification: a short table."""
    evaluated = [opts.track_label] + [opts.segment_label(t) for t in opts.query_seconds]
    lines = [f"{'MAP':<24}{'evaluated':>10}{'served':>10}{'+verify':>10}{'served':>10}"]
    for theirs, mine in zip(evaluated, level_labels(opts), strict=True):
        cells = []
        for suffix in ("", " +verify"):
            for table, label in ((exhaustive, theirs), (served, mine)):
                r = table.get(label + suffix)
                cells.append(f"{r.map.mean:>10.3f}" if r is not None else f"{'-':>10}")
        lines.append(f"{theirs:<24}" + "".join(cells))
    return "\n".join(lines)


def evaluate_served(
    model: Embedder,
    items: Sequence[Item],
    options: EvalOptions | None = None,
    *,
    settings: Settings | None = None,
    waveforms: Sequence[np.ndarray] | None = None,
    progress: bool = False,
) -> ServedEvaluation:
    """Every track and clip of `items` searched through the service's engine; see the module
    doc. `settings` (a `refrain.service.settings.Settings`) defaults to `Settings()`; its
    `data_dir` is replaced by a temporary folder."""
    from tqdm import tqdm

    from refrain.service.backend import open_store
    from refrain.service.engine import Engine, SearchRequest, TrackMeta
    from refrain.service.metrics import Metrics
    from refrain.service.settings import Settings
    from refrain.service.worker import InferenceWorker

    start = time.perf_counter()
    opts = options or EvalOptions()
    items = list(items)
    sr = model.sample_rate
    max_samples = None if opts.max_seconds is None else round(opts.max_seconds * sr)
    waves: list[np.ndarray | None] = []
    skipped: list[tuple[int, str]] = []
    for i, item in enumerate(items):
        source = waveforms[i] if waveforms is not None else item.path
        try:
            assert source is not None, f"item {i} has neither a path nor a waveform"
            x = model.waveform(source).numpy()
        except (AudioDecodeError, OSError) as e:
            skipped.append((i, str(e) or type(e).__name__))
            waves.append(None)
            continue
        waves.append(x[:max_samples] if max_samples is not None else x)
    kept = [i for i, w in enumerate(waves) if w is not None]
    longest = max(len(w) for w in waves if w is not None) / sr
    base = settings or Settings()
    draws = query_draws(opts, len(items))
    labels_of = np.unique([item.clique for item in items], return_inverse=True)[1]
    ids = np.array(kept)
    col = {i: c for c, i in enumerate(kept)}
    served = level_labels(opts)
    levels = served + [f"{name} +verify" for name in served]
    n_q = {served[0]: len(kept)} | {lab: len(kept) * opts.queries_per_track for lab in served[1:]}
    dist = {lab: np.full((n_q[lab.removesuffix(" +verify")], len(kept)), np.inf) for lab in levels}
    qids: dict[str, list[int]] = {lab: [] for lab in levels}
    refused: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="refrain-served-") as tmp:
        s = base.model_copy(
            update={"data_dir": Path(tmp), "max_query_s": max(base.max_query_s, longest + 1)}
        )
        top_k = min(len(kept) - 1, s.max_top_k)
        store = open_store(s, {**model.identity.to_dict(), "hop_s": s.reference_hop_s})
        worker = InferenceWorker(model, max_batch=s.max_batch, max_wait_s=0.0)
        engine = Engine(s, model, store, worker, Metrics())
        try:
            bar = tqdm(kept, desc="served index", unit="track", disable=not progress)
            for i in bar:
                assert waves[i] is not None
                engine.add_reference(
                    wav_bytes(waves[i], sr), TrackMeta(_tid(i), work_id=items[i].clique)
                )
            bar = tqdm(kept, desc="served search", unit="track", disable=not progress)
            for i in bar:
                x = waves[i]
                assert x is not None
                stored = store.get_track(_tid(i))
                assert stored is not None
                record = replace(stored, sequence=store.sequences([_tid(i)])[_tid(i)])
                vectors, starts = store.get_vectors(_tid(i))
                store.delete_track(_tid(i))
                queries = [(served[0], x)]
                for tau, name in zip(opts.query_seconds, served[1:], strict=True):
                    length = round(tau * sr)
                    for u in draws[tau][i]:
                        a = clip_start(u, len(x), length)
                        queries.append((name, x[a : a + length]))
                for name, clip in queries:
                    audio = wav_bytes(clip, sr)
                    for verify, label in ((False, name), (True, f"{name} +verify")):
                        row = len(qids[label])
                        qids[label].append(i)
                        try:
                            found = engine.search(SearchRequest(audio, top_k=top_k, verify=verify))
                        except RefrainError as e:  # e.g. a silent clip: the service refuses it
                            refused[label] = refused.get(label, 0) + 1
                            log.info("%s of %s refused: %s", label, items[i].path, e)
                            continue
                        for rank, hit in enumerate(found.hits):
                            dist[label][row, col[_index(hit.track.track_id)]] = rank
                store.add_track(record, vectors, starts)
        finally:
            worker.close()
            store.close()
    results: dict[str, EvalResult] = {}
    unranked: dict[str, float] = {}
    rng = np.random.default_rng(opts.seed)
    for label in levels:
        q = np.array(qids[label])
        d = dist[label]
        missing = np.isinf(d)
        unranked[label] = float(np.mean(missing.sum(1) - 1))  # less the query's own track
        # tracks a search did not return (or all, for a refused query) follow the returned
        # ones in a seeded random order: neither the manifest's order nor a guess
        d = np.where(missing, len(kept) + rng.random(d.shape), d)
        m = retrieval_metrics(d, labels_of[q], labels_of[ids], q, ids)
        results[label] = EvalResult.from_metrics(m)
    ordered = {lab: results[lab] for lab in (*served, *[f"{x} +verify" for x in served])}
    search = {
        k: getattr(s, k)
        for k in ("knn_k", "candidates", "verify_candidates", "verify_weight", "verify_expand")
    }
    search |= {
        "top_k": top_k,
        "reference_hop_s": s.reference_hop_s,
        "query_hop_s": s.query_hop_s,
        "index_factory": s.index_factory,
    }
    return ServedEvaluation(
        ordered, search, unranked, refused, skipped, time.perf_counter() - start
    )


def _tid(i: int) -> str:
    return f"item-{i:06d}"


def _index(track_id: str) -> int:
    return int(track_id.removeprefix("item-"))
