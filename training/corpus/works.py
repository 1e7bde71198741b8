"""Works: compositions from music21's bundled corpus, reduced to plain note lists.

A `Work` is what every version of one clique is rendered from: its parts as (onset, duration,
pitch, velocity) notes in quarter lengths after repeats are expanded, its measure grid (so that
versions can cut or repeat sections), and its tempo map. music21 is only needed to build one;
everything downstream works on the plain lists, which are cached as JSON.

Sources are files of the core corpus, or single tunes of the multi-tune ABC files. The Bach
chorales (every path containing "bach") are reserved for evaluation: `list_sources("default")`
never returns them, and `bach-eval` returns only them.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import re
import signal
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

import numpy as np

if TYPE_CHECKING:
    from music21 import stream

# Collections that are no music to learn from: notation demos and exercises (one of them a
# reharmonised Bach chorale).
_EXCLUDED_COLLECTIONS = frozenset({"demos", "theoryExercises"})
# Roman-numeral analyses carry chords, not a score.
_SCORE_SUFFIXES = frozenset({".abc", ".krn", ".mxl", ".xml", ".musicxml"})
_BACH_CHORALE = re.compile(r"^bwv\d+(\.\d+)?(-[a-z0-9]+)?$")
_NOT_CHORALES = frozenset({"bwv846"})  # the one keyboard prelude in music21's bach folder
# Base tempo (quarter notes per minute) of scores without a metronome mark, by their median
# note value in quarters: sixteenth-note tunes, eighth-note tunes (most folk dances), hymns
# and chorales in quarters, Renaissance polyphony in half and whole notes.
_DEFAULT_BPM = ((0.5, 72.0), (1.0, 110.0), (2.0, 88.0), (float("inf"), 144.0))
_MAX_EXPANDED_QUARTERS = 1200  # longer scores are played without their repeats
_MELODY_PART = re.compile(r"^(soprano|sopran|cantus|superius|melody|voice|tune)\b")
# Length of the melodic keys used for deduplication (intervals after merging repeated notes).
MELODY_KEY_LEN = 24
INCIPIT_LEN = 8


class WorkError(ValueError):
    """A corpus source could not be turned into a playable work."""


@dataclass(frozen=True)
class Source:
    """One candidate work: a corpus file, or one tune (1-based position) of an ABC file."""

    path: str  # relative to music21's corpus root, e.g. "essenFolksong/han1.abc"
    tune: int = 0  # position of the tune in a multi-tune ABC file, 0 for a one-work file

    @property
    def id(self) -> str:
        return f"{self.path}#{self.tune}" if self.tune else self.path

    @property
    def collection(self) -> str:
        return self.path.split("/", 1)[0]


@dataclass
class Part:
    name: str
    # (onset, duration) in quarter lengths, MIDI pitch, MIDI velocity; sorted by onset.
    notes: list[tuple[float, float, int, int]]


@dataclass
class Work:
    id: str  # the source id, stable across corpus versions
    title: str
    composer: str
    parts: list[Part]
    measures: list[float]  # measure starts in quarter lengths, then the end of the work
    tempo: list[tuple[float, float]]  # (offset in quarters, quarter notes per minute), from 0
    meter: tuple[int, int]  # the first time signature
    tempo_marked: bool  # False when the base tempo was guessed

    @property
    def clique(self) -> str:
        return clique_id(self.id)

    @property
    def quarters(self) -> float:
        return self.measures[-1]

    def seconds(self, start: float = 0.0, end: float | None = None) -> float:
        """Duration in seconds at the base tempo of the span [start, end) in quarters."""
        end = self.quarters if end is None else end
        total = 0.0
        for i, (offset, bpm) in enumerate(self.tempo):
            stop = self.tempo[i + 1][0] if i + 1 < len(self.tempo) else float("inf")
            lo, hi = max(start, offset), min(end, stop)
            if hi > lo:
                total += (hi - lo) * 60.0 / bpm
        return total

    def bpm_at(self, offset: float) -> float:
        bpm = self.tempo[0][1]
        for start, value in self.tempo:
            if start > offset:
                break
            bpm = value
        return bpm

    def melody_part(self) -> int:
        """Index of the part named as the tune (soprano, cantus, melody...), else 0."""
        for k, p in enumerate(self.parts):
            if _MELODY_PART.match(p.name.strip().lower()):
                return k
        return 0

    def homophony(self) -> float:
        """Mean share of the other parts that start a note with each onset of the melody part:
        high for hymns and songs with chords (the tune on top of block harmony), low for
        imitative polyphony, 1 for a tune alone."""
        k = self.melody_part()
        onsets = {round(n[0], 4) for n in self.parts[k].notes}
        if len(self.parts) < 2 or not onsets:
            return 1.0
        others = [{round(n[0], 4) for n in p.notes} for j, p in enumerate(self.parts) if j != k]
        return float(np.mean([np.mean([t in o for o in others]) for t in onsets]))

    def top_notes(self) -> list[tuple[float, float, int, int]]:
        """The melody as notes: the highest note at each onset of the part named as the tune
        (soprano, cantus, melody...), else of the first part (which is not always the tune:
        Bach's chorales put obbligato instruments above the soprano), each ending by the
        next onset."""
        highest: dict[float, tuple[float, float, int, int]] = {}
        for note in self.parts[self.melody_part()].notes:
            if note[0] not in highest or note[2] > highest[note[0]][2]:
                highest[note[0]] = note
        notes = [highest[k] for k in sorted(highest)]
        out = []
        for i, (onset, dur, pitch, vel) in enumerate(notes):
            nxt = notes[i + 1][0] if i + 1 < len(notes) else onset + dur
            out.append((onset, min(dur, nxt - onset), pitch, vel))
        return out

    def top_line(self) -> list[int]:
        """The melody's pitches (`top_notes`)."""
        return [n[2] for n in self.top_notes()]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Work:
        return cls(
            **{
                **d,
                "parts": [Part(p["name"], [tuple(n) for n in p["notes"]]) for p in d["parts"]],
                "tempo": [tuple(t) for t in d["tempo"]],
                "meter": tuple(d["meter"]),
            }
        )


def clique_id(work_id: str) -> str:
    """A short stable name for the clique of `work_id`."""
    return "w" + hashlib.sha1(work_id.encode()).hexdigest()[:10]


def stable_fraction(key: str) -> float:
    """A number in [0, 1) that depends on `key` only (for splits and orderings)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def is_reserved(path: str) -> bool:
    """Whether a corpus path belongs to the Bach material held out for evaluation."""
    return "bach" in path.lower()


def corpus_root() -> Path:
    from music21.common import getCorpusFilePath

    return Path(getCorpusFilePath())


@lru_cache(maxsize=4)
def list_sources(collection: str = "default") -> tuple[Source, ...]:
    """Candidate works of `collection`: "default" (everything but the reserved Bach material,
    demos and analyses) or "bach-eval" (the Bach chorales only), in corpus order."""
    if collection not in ("default", "bach-eval"):
        raise ValueError(f"expected collection 'default' or 'bach-eval', got {collection!r}")
    from music21 import corpus

    root = corpus_root()
    sources = []
    for path in sorted(corpus.getCorePaths()):
        rel = Path(path).relative_to(root).as_posix()
        if Path(rel).suffix.lower() not in _SCORE_SUFFIXES:
            continue
        if collection == "bach-eval":
            stem = Path(rel).stem.lower()
            parts = rel.split("/")
            if (
                len(parts) == 2
                and parts[0] == "bach"
                and _BACH_CHORALE.match(stem)
                and stem not in _NOT_CHORALES
            ):
                sources.append(Source(rel))
            continue
        if is_reserved(rel) or rel.split("/", 1)[0] in _EXCLUDED_COLLECTIONS:
            continue
        if rel.endswith(".abc"):
            n = len(_abc_tunes(path))
            sources.extend(Source(rel, k + 1 if n > 1 else 0) for k in range(n))
        else:
            sources.append(Source(rel))
    return tuple(sources)


def _read_text(path: Path) -> str:
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _abc_tunes(path: Path) -> list[str]:
    """The tunes of an ABC file, each with the file header (text before the first X:)."""
    text = _read_text(path)
    starts = [m.start() for m in re.finditer(r"^X:", text, flags=re.MULTILINE)]
    if not starts:
        return [text]
    header = text[: starts[0]]
    return [header + text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=False)]


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the block after `seconds` (main thread only: elsewhere, no limit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: FrameType | None) -> NoReturn:
        raise TimeoutError(f"took more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_work(source: Source, time_limit_s: float = 180.0) -> Work:
    """Parse `source` with music21 and reduce it to a `Work` (repeats expanded, ties merged)."""
    from music21 import converter, stream

    path = corpus_root() / source.path
    try:
        with _time_limit(time_limit_s):
            if source.path.endswith(".abc"):
                tunes = _abc_tunes(path)
                text = tunes[max(source.tune, 1) - 1]
                score = converter.parse(text, format="abc")
            else:
                score = converter.parse(path)
            if isinstance(score, stream.Opus):
                score = score.scores[0]
            return _reduce(score, source)
    except WorkError:
        raise
    except Exception as e:  # music21 raises many kinds on odd files
        raise WorkError(f"failed to read {source.id}: {type(e).__name__}: {e}") from e


def _reduce(score: stream.Score | stream.Part, source: Source) -> Work:
    from music21 import meter, stream, tempo

    # music21's repeat expansion takes minutes on whole multi-movement scores, which are
    # cut long before their repeats would matter.
    if score.highestTime <= _MAX_EXPANDED_QUARTERS:
        with contextlib.suppress(Exception):  # inconsistent repeat marks: play it as written
            score = score.expandRepeats()
    parts = list(score.parts) if isinstance(score, stream.Score) else [score]
    reduced = []
    for k, part in enumerate(parts):
        notes = _part_notes(part)
        if notes:
            reduced.append(Part(part.partName or f"part {k + 1}", notes))
    if not reduced:
        raise WorkError(f"{source.id} has no pitched notes")

    end = max(on + d for p in reduced for on, d, _, _ in p.notes)
    end = max(end, float(score.highestTime))
    signatures = list(score.recurse().getElementsByClass(meter.TimeSignature))
    ts = (signatures[0].numerator, signatures[0].denominator) if signatures else (4, 4)
    measures = sorted({float(m.offset) for m in parts[0].getElementsByClass(stream.Measure)})
    if len(measures) < 2:  # no measures: a grid of the first time signature
        bar = 4.0 * ts[0] / ts[1]
        measures = [i * bar for i in range(int(end // bar) + 1)]
    measures = [m for m in measures if m < end] + [end]
    if measures[0] > 0:
        measures.insert(0, 0.0)

    marks = [
        m for m in score.recurse().getElementsByClass(tempo.MetronomeMark) if m.getQuarterBPM()
    ]
    if marks:
        tmap: list[tuple[float, float]] = []
        for start, _, mark in score.metronomeMarkBoundaries():
            quarter_bpm = mark.getQuarterBPM() or marks[0].getQuarterBPM()
            assert quarter_bpm is not None  # `marks` holds marks with a tempo
            bpm = float(quarter_bpm)
            if tmap and tmap[-1][1] == bpm:
                continue
            tmap.append((float(start), min(max(bpm, 20.0), 400.0)))
        tmap[0] = (0.0, tmap[0][1])
    else:
        durations = sorted(d for p in reduced for _, d, _, _ in p.notes)
        median = durations[len(durations) // 2]
        tmap = [(0.0, next(bpm for below, bpm in _DEFAULT_BPM if median < below))]

    md = score.metadata
    title = (md.title or md.movementName or "") if md is not None else ""
    if title == Path(source.path).name:  # music21's stand-in when a score has no title
        title = ""
    composer = (md.composer or "") if md is not None else ""
    return Work(source.id, str(title), str(composer), reduced, measures, tmap, ts, bool(marks))


def _part_notes(part: stream.Stream) -> list[tuple[float, float, int, int]]:
    """A part's notes with tied notes merged (music21's stripTies is quadratic in the length
    of a score: minutes on a string quartet)."""
    from music21 import chord, harmony, note

    out: list[tuple[float, float, int, int]] = []
    tied: dict[int, int] = {}  # pitch -> index in `out` of the note a tie continues
    for n in part.flatten().notes:
        if isinstance(n, harmony.Harmony) or n.duration.isGrace:
            continue
        if isinstance(n, note.Note):
            pitches = [(n.pitch.midi, n.tie)]
        elif isinstance(n, chord.Chord):
            pitches = [(p.midi, n.getTie(p) or n.tie) for p in n.pitches]
        else:  # unpitched percussion
            continue
        onset, dur = float(n.offset), float(n.quarterLength)
        velocity = n.volume.velocity  # None unless the score sets it
        vel = int(velocity) if velocity else 80
        for pitch, tie in pitches:
            kind = tie.type if tie is not None else None
            k = tied.get(pitch)
            if k is not None and kind in ("stop", "continue"):
                start, _, _, v = out[k]
                out[k] = (start, max(onset + dur - start, out[k][1]), pitch, v)
            else:
                out.append((onset, dur, pitch, vel))
                k = len(out) - 1
            if kind in ("start", "continue"):
                tied[pitch] = k
            else:
                tied.pop(pitch, None)
    return sorted(n for n in out if 0 <= n[2] < 128 and n[1] > 0)


# Melodic keys: transposition-invariant interval sequences of the top line.


def intervals(line: list[int]) -> list[int]:
    """Successive intervals of a melody after merging repeated notes."""
    merged = [p for i, p in enumerate(line) if i == 0 or p != line[i - 1]]
    return [b - a for a, b in itertools.pairwise(merged)]


def normalise_title(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", title.lower()).strip()


def ngrams(seq: list[int], n: int) -> set[tuple[int, ...]]:
    return {tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)}
