"""The wire format: the API's response bodies as Pydantic models, which OpenAPI documents,
and the one encoding of the core's typed results into them.

The engine and the store answer in dataclasses (`SearchResult`, `TrackHit`, `TrackRecord`,
`IndexStats`); `search_response`, `track`, `added_track`, `track_page` and `stats` turn them
into these models, and the routes answer what those return (the console reads the same
JSON). So the rules of the format are written here alone:

- a track is its stored record less what the service keeps to itself (the chroma sequence);
- a hit's score has 6 decimals, the clip's duration is in seconds to the millisecond and
  the timings are in milliseconds to 2 decimals;
- every match has one shape: a segment match reports the alignment's fields (tempo ratio,
  key shift, score) as null, an aligned match its segment distance;
- an aligned tune's pitches are integers, null for a rest (0 in the core).

The job routes answer the job store's records, which FastAPI validates against these models.
Every failure answers `ErrorBody` with the status `http_errors.STATUS` gives its kind;
`responses(...)` lists those statuses for a route.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from refrain.index import AddResult, IndexStats, TrackRecord
    from refrain.model.align import Alignment
    from refrain.search.ranking import SegmentMatch, TrackHit
    from refrain.search.tune import AlignedTune
    from refrain.service.engine import SearchResult

SCORE_DECIMALS = 6
DURATION_DECIMALS = 3  # of a second
TIMING_DECIMALS = 2  # of a millisecond


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. audio_too_short")
    message: str = Field(description="what went wrong and what to do about it")


class ErrorBody(BaseModel):
    error: ErrorDetail


_WHY = {
    400: "the multipart body cannot be parsed (malformed_multipart)",
    401: "an API key is required",
    403: "the API key is not valid, or the path may not be read",
    404: "no such track or job",
    409: "a track with this id exists with other content",
    413: "the upload, archive, manifest, a file or a form field is over a limit",
    415: "the audio or the request body is of an unsupported type",
    422: "invalid or unknown parameters or fields, or audio that cannot be used "
    "(bad, too short, silent)",
    502: "a remote inference worker refused the request",
    503: "not ready, overloaded, or a backend is down; retry after Retry-After seconds",
    507: "the data volume has too little free space for the write",
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route may answer, all with `ErrorBody`."""
    return {s: {"model": ErrorBody, "description": _WHY[s]} for s in statuses}


READ = (401, 403, 503)  # every keyed read may answer these
WRITE = (401, 403, 503)


class Track(BaseModel):
    track_id: str
    title: str = ""
    artist: str = ""
    work_id: str | None = None
    duration_s: float | None = None
    content_sha256: str | None = None
    n_segments: int = 0
    added_at: float | None = None


class AddedTrack(Track):
    result: str = Field(description="added, replaced or unchanged")


class Deleted(BaseModel):
    deleted: str


class TrackPage(BaseModel):
    tracks: list[Track]
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next page")


class Match(BaseModel):
    query_start_s: float
    query_end_s: float
    ref_start_s: float
    ref_end_s: float
    distance: float | None = Field(
        description="segment distance of a segment match; null for an aligned match"
    )
    tempo_ratio: float | None = Field(
        description="reference seconds per clip second along the alignment (1.1: the clip "
        "plays slower); null for a segment match"
    )
    key_shift: int | None = Field(
        description="semitones the clip was shifted by to align; null for a segment match"
    )
    score: float | None = Field(
        description="alignment score (Qmax: frames linked less gaps); null for a segment match"
    )


class Tune(BaseModel):
    """The tune of the clip over a hit's first match and the reference's over the range it
    aligned with, point for point on the clip's time axis, for a person to see why they
    matched."""

    rate: float = Field(
        description="points per second of the clip: 5, fewer for a match over 80 s (at most "
        "400 points)"
    )
    query_start_s: float = Field(
        description="the clip second where point 0 starts; point i covers "
        "query_start_s + [i, i + 1) / rate"
    )
    query_end_s: float = Field(description="where the last point ends in the clip")
    ref_start_s: float = Field(description="the reference second aligned with query_start_s")
    tempo_ratio: float = Field(
        description="reference seconds per clip second: the reference's point i is read at "
        "ref_start_s + (t - query_start_s) * tempo_ratio, t the middle of the clip's point i"
    )
    key_shift: int = Field(
        description="semitones the clip was shifted by to align (the match's): the reference's "
        "pitches less key_shift are the clip's key, up to whole octaves"
    )
    query: list[int | None] = Field(
        description="the clip's tune: MIDI pitch per point (60 is middle C), null for a rest"
    )
    reference: list[int | None] = Field(
        description="the reference's tune on the clip's time axis, as long as `query`: MIDI "
        "pitch per point as sung or played in the reference, null for a rest or past its end"
    )


class Hit(BaseModel):
    track_id: str
    title: str
    artist: str
    work_id: str | None
    score: float = Field(description="calibrated probability that the clip is a version")
    distance: float = Field(description="reduced segment distance; lower is closer")
    matches: list[Match] = Field(description="matching time ranges, best first")
    transposition: int = Field(description="semitones the clip was shifted by to match")
    alignment: float | None = Field(
        description="Qmax of the alignment verification (on the upper chroma, or the full one "
        "for a track stored before it); null when the track was not aligned"
    )
    tune: Tune | None = Field(
        None,
        description="with tune=true, the aligned tune of the first match; null without it, "
        "for a track not aligned, and for one whose stored sequence holds no tune (added by "
        "an older version) or a clip whose tune was not computed",
    )


class WarningDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. short_clip")
    message: str = Field(description="what about the clip makes the answer less reliable")


class SearchResponse(BaseModel):
    results: list[Hit]
    query_duration_s: float
    timings_ms: dict[str, float]
    warnings: list[WarningDetail] = Field(
        default_factory=list,
        description="what makes this answer less reliable (short_clip: a clip shorter than "
        "the model finds versions in reliably); empty when there is nothing to say",
    )


class JobCreated(BaseModel):
    job_id: str
    state: str
    total: int
    ignored: int = Field(description="files in the request that are not audio")


class JobCounts(BaseModel):
    total: int
    pending: int
    done: int
    skipped: int
    failed: int


class ItemError(BaseModel):
    filename: str
    track_id: str
    code: str | None
    message: str | None


class JobItem(BaseModel):
    filename: str
    track_id: str
    state: str
    result: str | None


class JobSummary(BaseModel):
    """A job as `GET /v1/jobs` lists it."""

    job_id: str
    state: str = Field(
        description="queued, running, done (counts.failed may be > 0: some items failed) or "
        "failed (every item failed, or the index refused writes)"
    )
    source: str
    counts: JobCounts
    ignored: int
    created: float
    started: float | None
    finished: float | None
    error: str | None
    progress: float


class Job(JobSummary):
    """One job with its item errors, ETA and, if asked, every item."""

    errors: list[ItemError]
    items: list[JobItem] | None = Field(None, description="with ?items=true")
    eta_s: float | None


class JobPage(BaseModel):
    jobs: list[JobSummary]
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next page")


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str = Field(description="ready, loading, failed or degraded")
    error: str | None = None


class IndexSummary(BaseModel):
    tracks: int
    segments: int
    bytes_on_disk: int
    factory: str
    vector_dtype: str
    ann_trained: bool
    ann_trained_on: int
    ann_on_gpu: bool
    tombstones: int
    seq: int
    snapshot_seq: int
    journal_records: int
    journal_bytes: int


class Stats(BaseModel):
    index: IndexSummary
    model: dict[str, Any]
    queue_depth: int


# -- encoding: the core's results -> the models above --------------------------------------------


def track(record: TrackRecord) -> Track:
    """A stored track: the record's fields that `Track` documents."""
    return Track(**_fields(record, Track))


def added_track(result: AddResult, record: TrackRecord) -> AddedTrack:
    """A track as POST /v1/tracks answers it: the stored track and what the write did."""
    return AddedTrack(**_fields(record, Track), result=result.value)


def track_page(records: list[TrackRecord], next_cursor: str | None) -> TrackPage:
    return TrackPage(tracks=[track(r) for r in records], next_cursor=next_cursor)


def match(m: SegmentMatch | Alignment) -> Match:
    """A matching time range; the fields of the other kind of match are null."""
    return Match(**{name: getattr(m, name, None) for name in Match.model_fields})


def hit(h: TrackHit) -> Hit:
    t = h.track
    return Hit(
        track_id=t.track_id,
        title=t.title,
        artist=t.artist,
        work_id=t.work_id,
        score=round(h.score, SCORE_DECIMALS),
        distance=h.distance,
        matches=[match(m) for m in h.matches],
        transposition=h.transposition,
        alignment=h.alignment,
        tune=None if h.tune is None else tune(h.tune),
    )


def tune(t: AlignedTune) -> Tune:
    """An aligned tune: seconds to the hundredth, pitches as integers, null for rests."""
    n = len(t.query)
    return Tune(
        rate=t.rate,
        query_start_s=round(t.query_start_s, 2),
        query_end_s=round(t.query_start_s + n / t.rate, 2),
        ref_start_s=round(t.ref_start_s, 2),
        tempo_ratio=round(t.tempo_ratio, 4),
        key_shift=t.key_shift,
        query=[int(p) or None for p in t.query],
        reference=[int(p) or None for p in t.reference],
    )


def search_response(result: SearchResult) -> SearchResponse:
    return SearchResponse(
        results=[hit(h) for h in result.hits],
        query_duration_s=round(result.query_duration_s, DURATION_DECIMALS),
        timings_ms={k: round(v * 1000, TIMING_DECIMALS) for k, v in result.timings_s.items()},
        warnings=[WarningDetail(code=w.code, message=w.message) for w in result.warnings],
    )


def stats(index: IndexStats, model: dict[str, Any], queue_depth: int) -> Stats:
    return Stats(index=IndexSummary(**asdict(index)), model=model, queue_depth=queue_depth)


def _fields(record: Any, model: type[BaseModel]) -> dict[str, Any]:
    return {name: getattr(record, name) for name in model.model_fields}
