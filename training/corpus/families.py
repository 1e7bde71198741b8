"""Chorale tunes: music21's Bach chorale files grouped by melody, for the held-out evaluation.

Bach harmonised many chorale tunes several times (in different cantatas, passions and the
four-part collections), and music21 ships several harmonisations of many of them. In the
`bach-eval` corpus a clique is a tune (a *family*) and its versions are renderings of its
different harmonisations, so that retrieving a chorale means recognising the tune under
another harmony, key, tempo and orchestration, not only another rendering of the same file.

How families are found. The melody of a file is its soprano: `Work.top_line()`, the part named
as the tune (409 of music21's 412 chorale files name their soprano, also those with obbligato
instruments written above it; the three Humdrum files have unnamed parts, the soprano first),
repeated notes merged; the catalog keeps it as `Facts.intervals`. Two melodies are compared
by a local alignment of their pitch classes (match +1, mismatch -1, a gap of g notes
-(1.5 + 0.25 (g - 1)): ornaments and passing notes cost little), the second melody transposed
by whichever of two offsets scores better: the one that lines up the final notes, and the one
that best matches the two pitch-class histograms. The score is divided by the largest of the
shorter melody's length in notes, 0.7 times the longer one's, and 30, so a short tune must
match almost entirely and one melody must not be much longer than the other (a whole Te Deum
does not join the four lines of it that a cantata quotes). Two files are linked when their
similarity reaches `TUNE_THRESHOLD`, or `TITLED_THRESHOLD` when music21's chorale lists give
them the same title (`chorale_title`); families are the connected groups (union-find).

How the thresholds were chosen, on all 412 chorale files of music21 10.5, checked by hand
against the titles of music21's chorale lists and the tunes their texts are sung to
(`refrain corpus families` prints the table). The similarities of the 84,666 pairs are
bimodal, and none falls between 0.583 and 0.617: every pair above that gap joins
harmonisations of one tune (the weakest links: "Nun bitten wir den heiligen Geist" BWV
197.5-385 at 0.617, "Nun laßt uns Gott dem Herren" 165.6-194.12 and "Christus, der ist mein
Leben" 281-282 at 0.633, variants in another metre or with ornaments), and the highest pairs
below it are different tunes sharing stock phrases ("Ach wie nichtig" 26.6 with "Herr Christ,
der einig Gotts Sohn" 96.6 at 0.583 and 164.6, "Freu dich sehr" 25.6 with "Aus meines Herzens
Grunde" 269 at 0.577, "Auf, auf, mein Herz" 268 with "Es ist gewisslich an der Zeit" 307).
`TUNE_THRESHOLD` is the middle of the gap, 0.60; any value in it gives the same families. A few
variant forms of one tune score below the gap, as different tunes do; they share a title, and
the same-titled pairs are bimodal too: 0.45-0.56 for variants ("Christus, der uns selig macht"
245.37-283, "O Gott, du frommer Gott" 24.6-399, "Jesu, nun sei gepreiset" 41.6-362), at most
0.36 for one text sung to two melodies ("Wär Gott nicht mit uns diese Zeit" 14.5 and 257,
"Befiehl du deine Wege" 272 and 270, "O Gott, du frommer Gott" 45.7 and 399), hence
`TITLED_THRESHOLD` 0.40. A text sung to another tune joins that tune ("Befiehl du deine Wege"
BWV 270 and 271 with "O Haupt voll Blut und Wunden"). The result: 213 tunes, 75 of them with
two files or more (274 files).

Same harmonisation. Some files hold the same harmonisation: exact copies (BWV 197.7-a and
398), the same music for two stanzas (227.1 and 227.11), or one setting with and without its
instrumental parts, interludes or continuo, or transposed (248.9-1 and 248.9-s, 18.5-lz and
18.5-w). Two members are the same harmonisation when every one of their four voices (soprano,
alto, tenor, bass) matches the other file's, transposed like the soprano, over at least
`SAME_HARMONISATION` of the shorter line (exact pitches, local alignment as above). Over the
513 pairs of files of one tune this overlap is bimodal too: 21 pairs at 0.88 or more (copies,
settings reused in another cantata like 41.6 and 171.6, the transposed 244.15 and 244.17) and
the rest at 0.73 or less, hence 0.8. Duplicates keep one file (the one with the fewest parts,
then the longest, then the first by name), so that a family's members are different
harmonisations.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from refrain.training.corpus.works import Part, Work, list_sources, normalise_title, stable_fraction

if TYPE_CHECKING:
    from refrain.training.corpus.catalog import Catalog

TUNE_THRESHOLD = 0.60
TITLED_THRESHOLD = 0.40  # for two files that music21's chorale lists give the same title
SAME_HARMONISATION = 0.8
_MATCH, _MISMATCH, _GAP_OPEN, _GAP_EXTEND = 1.0, -1.0, 1.5, 0.25
_MIN_NOTES = 30  # shorter melodies are scored as if this long
_LONGER_SHARE = 0.7  # the score is divided by at least this share of the longer melody
_PAD = -(10**6)
_NEG = -1e9
_VOICES = tuple(
    re.compile(rf"^({names})\b") for names in ("soprano|sopran", "alto|alt", "tenor", "bass|basso")
)


def melody(intervals: Sequence[int]) -> np.ndarray:
    """Pitches of a melody (repeated notes merged) from its intervals, the first note 0."""
    return np.concatenate([[0], np.cumsum(np.asarray(intervals, dtype=np.int64))])


def _merged(pitches: Iterable[int]) -> list[int]:
    out: list[int] = []
    for p in pitches:
        if not out or out[-1] != p:
            out.append(int(p))
    return out


def _align(a: Sequence[int] | np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Best local alignment score of `a` against each row of `rows` (padded with _PAD)."""
    m, width = rows.shape
    valid = rows != _PAD
    j = np.arange(width + 1)
    h = np.zeros((m, width + 1))
    f = np.full((m, width + 1), _NEG)  # alignments ending in a gap in `rows`
    best = np.zeros(m)
    for x in a:
        s = np.where(rows == x, _MATCH, _MISMATCH)
        s[~valid] = _NEG
        f = np.maximum(f - _GAP_EXTEND, h - _GAP_OPEN)
        t = np.zeros((m, width + 1))
        t[:, 1:] = np.maximum(0.0, h[:, :-1] + s)
        t = np.maximum(t, f)
        t[:, 0] = 0.0
        # gaps in `a`: the best t[k] - open - extend * (j - k - 1) over k < j
        run = np.maximum.accumulate(t + _GAP_EXTEND * j, axis=1)
        e = np.full((m, width + 1), _NEG)
        e[:, 1:] = run[:, :-1] - _GAP_OPEN - _GAP_EXTEND * (j[1:] - 1)
        h = np.maximum(t, e)
        best = np.maximum(best, h.max(axis=1))
    return best


def _padded(seqs: Sequence[np.ndarray]) -> np.ndarray:
    rows = np.full((len(seqs), max(len(s) for s in seqs)), _PAD, dtype=np.int64)
    for k, s in enumerate(seqs):
        rows[k, : len(s)] = s
    return rows


def _histograms(melodies: Sequence[np.ndarray]) -> np.ndarray:
    return np.array([np.bincount(np.mod(m, 12), minlength=12) for m in melodies], dtype=float)


def _offsets(melodies: Sequence[np.ndarray], i: int, targets: np.ndarray) -> list[np.ndarray]:
    """The two candidate transpositions t (mod 12) with target + t ~ melody i: final notes
    lined up, and the best match of the pitch-class histograms."""
    hist = _histograms([melodies[k] for k in targets])
    own = _histograms([melodies[i]])[0]
    rolled = np.stack([np.roll(hist, t, axis=1) for t in range(12)], axis=1)  # [k, t, pc]
    finals = np.array([melodies[k][-1] for k in targets])
    return [np.mod(melodies[i][-1] - finals, 12), np.argmax(rolled @ own, axis=1)]


def tune_similarity(melodies: Sequence[Sequence[int] | np.ndarray]) -> np.ndarray:
    """Symmetric matrix of tune similarities (see the module docstring) of `melodies`, each
    a list of pitches with repeated notes merged (any transposition)."""
    mels = [np.asarray(m, dtype=np.int64) for m in melodies]
    n = len(mels)
    lengths = np.array([len(m) for m in mels], dtype=float)
    sim = np.zeros((n, n))
    for i in range(n - 1):
        targets = np.arange(i + 1, n)
        pcs = _padded([np.mod(mels[k], 12) for k in targets])
        best = np.zeros(len(targets))
        for t in _offsets(mels, i, targets):
            shifted = np.where(pcs == _PAD, _PAD, np.mod(pcs + t[:, None], 12))
            best = np.maximum(best, _align(np.mod(mels[i], 12), shifted))
        la, lb = lengths[i], lengths[targets]
        norm = np.maximum.reduce(
            [np.minimum(la, lb), _LONGER_SHARE * np.maximum(la, lb), np.full(len(lb), _MIN_NOTES)]
        )
        sim[i, targets] = sim[targets, i] = best / norm
    np.fill_diagonal(sim, 1.0)
    return sim


def group(
    ids: Sequence[str],
    sim: np.ndarray,
    threshold: float = TUNE_THRESHOLD,
    titles: Sequence[str] | None = None,
    titled_threshold: float = TITLED_THRESHOLD,
) -> list[list[str]]:
    """Connected groups of `ids` over the pairs with similarity >= threshold, or >=
    titled_threshold when both have the same non-empty title (union-find); each group sorted,
    the groups ordered by their first member."""
    parent = list(range(len(ids)))
    linked = sim >= threshold
    if titles is not None:
        names = np.array([normalise_title(t) for t in titles], dtype=object)
        same = (names[:, None] == names[None, :]) & (names[:, None] != "")
        linked |= same & (sim >= titled_threshold)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in zip(*np.nonzero(np.triu(linked, 1)), strict=False):
        a, b = root(int(i)), root(int(j))
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[int, list[str]] = {}
    for k, name in enumerate(ids):
        groups.setdefault(root(k), []).append(name)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])


def family_id(members: Sequence[str]) -> str:
    """A short stable name for the tune whose (readable) files are `members`."""
    return "t" + hashlib.sha1(("tune:" + min(members)).encode()).hexdigest()[:10]


# Same harmonisation: the four voices compared.


def voices(work: Work) -> list[Part]:
    """Soprano, alto, tenor and bass: the first part named for each, or the first four parts
    when the parts are not named so."""
    found: list[Part] = []
    for voice in _VOICES:
        named = [p for p in work.parts if voice.match(p.name.strip().lower())]
        if named:
            found.append(named[0])
    return found if len(found) == 4 else list(work.parts[:4])


def _line(part: Part) -> np.ndarray:
    highest: dict[float, int] = {}
    for onset, _, pitch, _ in part.notes:
        highest[onset] = max(pitch, highest.get(onset, 0))
    return np.array(_merged(highest[k] for k in sorted(highest)), dtype=np.int64)


def harmonisation_overlap(a: Work, b: Work) -> float:
    """The least, over the four voices, share of the shorter line that matches the other
    file's line (exact pitches, `b` transposed as its soprano best matches `a`'s)."""
    va, vb = [_line(p) for p in voices(a)], [_line(p) for p in voices(b)]
    if len(va) != len(vb) or not va or min(len(x) for x in va + vb) == 0:
        return 0.0
    mels = [va[0], vb[0]]
    best_t, best = 0, -1.0
    for t in {int(o[0]) for o in _offsets(mels, 0, np.array([1]))}:
        # the octave that brings the two sopranos' mean pitches together
        t += 12 * round((va[0].mean() - vb[0].mean() - t) / 12.0)
        score = _align(va[0], (vb[0] + t)[None, :])[0]
        if score > best:
            best_t, best = t, score
    shares = [
        _align(x, (y + best_t)[None, :])[0] / min(len(x), len(y))
        for x, y in zip(va, vb, strict=False)
    ]
    return float(min(shares))


def same_harmonisation(a: Work, b: Work) -> bool:
    return harmonisation_overlap(a, b) >= SAME_HARMONISATION


# Titles: music21's chorale lists.


def chorale_title(source_id: str) -> str:
    """The title music21's chorale lists give the chorale file `source_id` (bach/bwvNNN.x...),
    or "" when they list no such BWV number."""
    from music21.corpus import chorales

    stem = Path(source_id).stem.lower().removeprefix("bwv")
    base = re.sub(r"-.*$", "", stem)
    by_bwv = _rk_titles()
    for key in (stem, stem.replace("-lz", "-l"), base if "-a" not in stem else None):
        if key and key in by_bwv:
            return by_bwv[key]
    if "-a" not in stem:
        for key, title in by_bwv.items():
            if key.startswith(base + "-"):
                return title
    if base.isdigit():
        listed = chorales.ChoraleList().byBWV.get(int(base))
        if listed:
            return str(listed["title"])
    return ""


_RK: dict[str, str] = {}


def _rk_titles() -> dict[str, str]:
    if not _RK:
        from music21.corpus import chorales

        _RK.update({str(k): str(v["title"]) for k, v in chorales.ChoraleListRKBWV().byBWV.items()})
    return _RK


# Families for a corpus.


@dataclass
class Family:
    id: str
    members: list[str]  # the distinct harmonisations rendered, in name order
    duplicates: dict[str, str] = field(default_factory=dict)  # file -> member it duplicates
    files: list[str] = field(default_factory=list)  # every readable file of the tune


@dataclass
class TuneSelection:
    families: list[Family]  # in selection order
    singles: int = 0  # tunes skipped for too few distinct harmonisations

    @property
    def ids(self) -> list[str]:
        return [m for f in self.families for m in f.members]

    def family_of(self) -> dict[str, str]:
        return {m: f.id for f in self.families for m in f.members}


def chorale_families(
    melodies: Mapping[str, Sequence[int]], titles: Callable[[str], str] | None = chorale_title
) -> list[list[str]]:
    """Tunes of the chorale files `melodies` (id -> intervals of the soprano, repeated notes
    merged), singletons included, each a sorted list of ids; `titles` names a file (None: no
    titles)."""
    ids = sorted(melodies)
    if not ids:
        return []
    sim = tune_similarity([melody(melodies[i]) for i in ids])
    return group(ids, sim, titles=[titles(i) for i in ids] if titles else None)


def cataloged_melodies(catalog: Catalog) -> dict[str, tuple[int, ...]]:
    """Soprano intervals of every readable chorale file that `catalog` (a
    `catalog.Catalog`) holds facts about."""
    found = {}
    for source in list_sources("bach-eval"):
        facts = catalog.get(source.id)
        if facts is not None and not facts.error:
            found[source.id] = tuple(facts.intervals)
    return found


def select_families(
    readable: Mapping[str, Sequence[int]],
    accepted: Sequence[str],
    n: int | None,
    load: Callable[[list[str]], list[Work]],
    min_family: int = 2,
    rejected: dict[str, str] | None = None,
    titles: Callable[[str], str] | None = chorale_title,
) -> TuneSelection:
    """The first `n` tunes (all when None), in an order fixed by their ids, with at least
    `min_family` distinct harmonisations among the `accepted` files. `readable` holds the
    melodies (intervals) of every readable chorale file: a family and its id do not depend on
    which files the length filters accept. `load` parses works (cached by the caller). Files
    left out are recorded in `rejected`."""
    rejected = rejected if rejected is not None else {}
    ok = set(accepted)
    tunes = chorale_families(readable, titles)
    tunes.sort(key=lambda t: stable_fraction("order:" + family_id(t)))
    selection = TuneSelection([])
    for files in tunes:
        if n is not None and len(selection.families) >= n:
            break
        candidates = [f for f in files if f in ok]
        if len(candidates) < min_family:
            selection.singles += 1
            for f in candidates:
                rejected[f] = f"tune with fewer than {min_family} harmonisations"
            continue
        works = {w.id: w for w in load(candidates)} if len(candidates) > 1 else {}
        order = sorted(
            candidates,
            key=lambda f: (len(works[f].parts), -works[f].quarters, f) if works else (0, 0, f),
        )
        kept: list[str] = []
        duplicates: dict[str, str] = {}
        for f in order:
            twin = next((k for k in kept if same_harmonisation(works[k], works[f])), None)
            if twin is None:
                kept.append(f)
            else:
                duplicates[f] = twin
        if len(kept) < min_family:
            selection.singles += 1
            for f in candidates:
                rejected[f] = f"tune with fewer than {min_family} harmonisations"
            continue
        for f, twin in duplicates.items():
            rejected[f] = f"duplicate of {twin} (the same harmonisation)"
        selection.families.append(Family(family_id(files), sorted(kept), duplicates, files))
    return selection


# The table of a selection.


def table(selection: TuneSelection) -> list[dict]:
    """The families as JSON-ready rows, with titles."""
    return [
        {
            "family": f.id,
            "members": [{"work": m, "title": chorale_title(m)} for m in f.members],
            "duplicates": f.duplicates,
            "files": f.files,
        }
        for f in selection.families
    ]


def format_table(selection: TuneSelection) -> str:
    lines = []
    for f in sorted(selection.families, key=lambda f: (-len(f.members), f.members[0])):
        lines.append(f"{f.id}  {len(f.members)} harmonisations")
        for m in f.members:
            lines.append(f"    {Path(m).name:20s} {chorale_title(m)}")
        for d, twin in sorted(f.duplicates.items()):
            lines.append(f"    ({Path(d).name} = {Path(twin).name}, same harmonisation)")
    return "\n".join(lines)


def write_table(out: Path, selection: TuneSelection) -> None:
    data = {
        "threshold": TUNE_THRESHOLD,
        "same_harmonisation": SAME_HARMONISATION,
        "families": table(selection),
        "skipped_tunes": selection.singles,
    }
    path = Path(out) / "families.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)
