"""Choosing works: cached facts about every source, the Bach guard, deduplication and splits.

Parsing a score takes 0.05-2 s, so the facts needed to accept or reject a source (length,
melody, title) are kept in an append-only JSON-lines catalog and reused by later runs.
Sources are visited in an order fixed by hashing their ids, and the first `n` acceptable ones
are taken: asking for more works extends a corpus instead of reshuffling it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Generator, Iterable
from contextlib import closing
from dataclasses import asdict, dataclass, field
from importlib import resources
from multiprocessing import Pool
from pathlib import Path

from refrain.training.corpus.works import (
    INCIPIT_LEN,
    MELODY_KEY_LEN,
    Source,
    WorkError,
    intervals,
    is_reserved,
    list_sources,
    load_work,
    ngrams,
    normalise_title,
    stable_fraction,
)

SPLITS = ("train", "valid", "test")
_MAX_INTERVALS = 400  # kept per source; enough for every key below
# Bumped whenever reading a score changes, so that cataloged facts from before are re-read.
FACTS_VERSION = 3
# Bach guard thresholds, in intervals of the melody (repeated notes merged); see BachGuard.
_GUARD_INCIPIT = 10
_GUARD_RUN = 14
_GUARD_LONG = 150  # melodies longer than this need a run of _GUARD_LONG_RUN
_GUARD_LONG_RUN = 20
_GUARD_GRAM = 6
_GUARD_SHARE = 0.5
_GUARD_MIN_SHARED = 6


@dataclass(frozen=True)
class Facts:
    """What selection needs to know about one source."""

    id: str
    error: str = ""  # why it could not be read; empty when it could
    title: str = ""
    seconds: float = 0.0  # at the base tempo, repeats expanded
    parts: int = 0
    notes: int = 0
    intervals: tuple[int, ...] = ()  # of the top line, repeated notes merged
    homophony: float = 1.0  # Work.homophony(): near 1 when the top line is a tune over chords
    reader: str = ""  # music21 version and FACTS_VERSION that produced these facts


def reader_version() -> str:
    import music21

    return f"music21-{music21.__version__}/{FACTS_VERSION}"


def facts_of(source: Source) -> Facts:
    version = reader_version()
    try:
        work = load_work(source)
    except WorkError as e:
        return Facts(source.id, error=str(e), reader=version)
    return Facts(
        source.id,
        title=work.title,
        seconds=round(work.seconds(), 3),
        parts=len(work.parts),
        notes=sum(len(p.notes) for p in work.parts),
        intervals=tuple(intervals(work.top_line())[:_MAX_INTERVALS]),
        homophony=round(work.homophony(), 3),
        reader=version,
    )


class Catalog:
    """Append-only JSON-lines store of `Facts`, keyed by source id; `path=None` keeps none."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._facts: dict[str, Facts] = {}
        version = reader_version()
        if self.path is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:  # a line torn by an interrupted run
                    continue
                if d.get("reader") == version:
                    d["intervals"] = tuple(d["intervals"])
                    self._facts[d["id"]] = Facts(**d)

    def __len__(self) -> int:
        return len(self._facts)

    def get(self, source_id: str) -> Facts | None:
        return self._facts.get(source_id)

    def add(self, facts: Iterable[Facts]) -> None:
        facts = list(facts)
        self._facts.update((f.id, f) for f in facts)
        if self.path is not None and facts:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a+b") as f:
                if f.tell() > 0:  # finish a line torn by an interrupted run
                    f.seek(-1, 2)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
            with self.path.open("a") as text:
                text.writelines(json.dumps(asdict(x), ensure_ascii=False) + "\n" for x in facts)


class BachGuard:
    """Recognises the tunes of the reserved Bach chorales inside other collections: folk
    songs and hymns whose melodies Bach harmonised would otherwise leak into training.

    Chorale tunes and folk songs are both mostly stepwise, so short shared runs of intervals
    are common by chance; the guard errs on the side of rejecting (about 3% of the other works
    match, most of them by coincidence), since a lost training work costs little and a leaked
    chorale tune biases the evaluation."""

    def __init__(self, melodies: dict[str, dict]) -> None:
        self.melodies = melodies
        self._incipits: dict[tuple[int, ...], str] = {}
        self._runs: dict[int, dict[tuple[int, ...], str]] = {_GUARD_RUN: {}, _GUARD_LONG_RUN: {}}
        self._grams: dict[tuple[int, ...], set[str]] = {}
        self._sizes: dict[str, int] = {}
        for chorale, m in melodies.items():
            ivs = list(m["intervals"])
            if len(ivs) >= _GUARD_INCIPIT:
                self._incipits.setdefault(tuple(ivs[:_GUARD_INCIPIT]), chorale)
            for n, runs in self._runs.items():
                for g in ngrams(ivs, n):
                    runs.setdefault(g, chorale)
            grams = ngrams(ivs, _GUARD_GRAM)
            self._sizes[chorale] = len(grams)
            for g in grams:
                self._grams.setdefault(g, set()).add(chorale)

    @classmethod
    def shipped(cls) -> BachGuard:
        """The guard built from music21's Bach chorales (`training/corpus/bach_melodies.json`)."""
        text = resources.files("refrain.training.corpus").joinpath("bach_melodies.json").read_text()
        return cls(json.loads(text)["melodies"])

    @classmethod
    def from_facts(cls, facts: Iterable[Facts]) -> BachGuard:
        return cls(
            {f.id: {"title": f.title, "intervals": list(f.intervals)} for f in facts if not f.error}
        )

    def match(self, facts: Facts) -> str | None:
        """The chorale whose tune `facts` seems to carry, or None. A match is the same opening
        (`_GUARD_INCIPIT` intervals), a long common run (`_GUARD_RUN` intervals), or a large
        share of the shorter melody's `_GUARD_GRAM`-grams found in one chorale."""
        ivs = list(facts.intervals)
        if len(ivs) >= _GUARD_INCIPIT and (hit := self._incipits.get(tuple(ivs[:_GUARD_INCIPIT]))):
            return hit
        # Long melodies (whole mass movements) meet a given run more often by chance.
        n = _GUARD_RUN if len(ivs) <= _GUARD_LONG else _GUARD_LONG_RUN
        for g in ngrams(ivs, n):
            if g in self._runs[n]:
                return self._runs[n][g]
        grams = ngrams(ivs, _GUARD_GRAM)
        shared = Counter(c for g in grams for c in self._grams.get(g, ()))
        for chorale, count in shared.most_common():
            if count < _GUARD_MIN_SHARED:
                break
            if count >= _GUARD_SHARE * min(len(grams), self._sizes[chorale]):
                return chorale
        return None


@dataclass
class Selection:
    works: list[Facts] = field(default_factory=list)  # accepted, in selection order
    rejected: dict[str, str] = field(default_factory=dict)  # source id -> reason


@dataclass(frozen=True)
class SelectOptions:
    collection: str = "default"  # "default" or "bach-eval"
    min_seconds: float = 20.0  # shorter works (fragments) are skipped
    min_notes: int = 16
    min_parts: int = 1  # e.g. 3 for part-writing only (hymn-, madrigal-, mass-like works)
    # Works whose top line is a tune: a single line, or parts moving with it (hymn-like and
    # song-like part-writing), e.g. 0.65; 0 takes every work.
    min_homophony: float = 0.0
    # Skip works whose melody or title repeats an accepted one's; off for the chorale tunes,
    # whose harmonisations share their melody (training/corpus/families.py groups them).
    dedupe: bool = True


def ordered_sources(collection: str) -> list[Source]:
    """Sources in the fixed order in which selection visits them."""
    return sorted(list_sources(collection), key=lambda s: stable_fraction("order:" + s.id))


def select_works(
    n: int | None,
    catalog: Catalog,
    options: SelectOptions = SelectOptions(),
    jobs: int = 1,
    guard: BachGuard | None = None,
    progress: Callable[[int], None] | None = None,
) -> Selection:
    """The first `n` acceptable works (all when `n` is None) in the fixed source order."""
    if options.collection == "default" and guard is None:
        guard = BachGuard.shipped()
    selection = Selection()
    seen: dict[tuple, str] = {}
    facts_stream = _facts_in_order(ordered_sources(options.collection), catalog, jobs)
    with closing(facts_stream):  # stops its worker pool as soon as enough works are found
        for facts in facts_stream:
            if progress is not None:
                progress(1)
            reason = _rejection(facts, options, guard, seen)
            if reason:
                selection.rejected[facts.id] = reason
                continue
            selection.works.append(facts)
            if n is not None and len(selection.works) >= n:
                break
    return selection


def _rejection(
    facts: Facts, options: SelectOptions, guard: BachGuard | None, seen: dict[tuple, str]
) -> str:
    if is_reserved(facts.id) and options.collection != "bach-eval":
        return "reserved for evaluation"
    if facts.error:
        return "unreadable"
    if facts.seconds < options.min_seconds or facts.notes < options.min_notes:
        return "too short"
    if options.min_parts > 1 and facts.parts < options.min_parts:
        return "too few parts"
    if facts.homophony < options.min_homophony:
        return "no tune on top"
    if guard is not None and (chorale := guard.match(facts)):
        return f"melody of Bach chorale {chorale}"
    if not options.dedupe:
        return ""
    keys: list[tuple[object, ...]] = [("melody", facts.intervals[:MELODY_KEY_LEN])]
    if facts.title:
        keys.append(("title", normalise_title(facts.title), facts.intervals[:INCIPIT_LEN]))
    for key in keys:
        if key in seen:
            return f"duplicate of {seen[key]}"
    for key in keys:
        seen[key] = facts.id
    return ""


def _facts_in_order(
    sources: list[Source], catalog: Catalog, jobs: int
) -> Generator[Facts, None, None]:
    """Facts of `sources` in order; the uncataloged ones are parsed ahead by `jobs` processes
    (closing the iterator stops them)."""
    missing = [s for s in sources if catalog.get(s.id) is None]
    pool = Pool(jobs) if jobs > 1 and len(missing) > 1 else None
    try:
        parsed = pool.imap(facts_of, missing) if pool else map(facts_of, missing)
        for source in sources:
            facts = catalog.get(source.id)
            if facts is None:
                facts = next(parsed)
                catalog.add([facts])
            yield facts
    finally:
        if pool is not None:
            pool.terminate()


def split_of(work_id: str, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """The split of a work, fixed by its id alone: every version of it lands in the same one."""
    u = stable_fraction("split:" + work_id) * sum(fractions)
    acc = 0.0
    for name, frac in zip(SPLITS, fractions, strict=False):
        acc += frac
        if u < acc:
            return name
    return SPLITS[-1]
