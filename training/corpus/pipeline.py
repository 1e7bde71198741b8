"""Building a corpus: select works, draw versions, render them in parallel, write the manifest.

Layout of an output folder:

    manifest.csv            one row per version (paths relative to this folder)
    params.jsonl            the full parameters of every version
    corpus.json             the options the corpus was built with, and what was skipped why
    catalog.jsonl         cached facts about every source looked at
    works/<clique>.json     each selected work as plain note lists
    audio/<clique>/vNN.flac (or .mp3) and vNN.json, the version's record
    audio/<clique>/vNN.tune.npy  the tune's MIDI pitch at every CQT frame (corpus/tune.py)
    families.json           bach-eval only: the chorale tunes and their harmonisations

In a bach-eval corpus a manifest clique is a tune (training/corpus/families.py): the versions of
all its harmonisations; each harmonisation (a chorale file, the `work` column) keeps its own
<clique> folder, and its records in params.jsonl keep that clique and name the tune `family`.

A version is complete when its record exists: audio is written under a temporary name and
renamed, then the record likewise, so an interrupted run leaves no half file that looks done.
A rerun skips complete versions whose recorded parameters are still the ones drawn.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import soundfile as sf
from tqdm import tqdm

from refrain.training.corpus.catalog import (
    Catalog,
    Selection,
    SelectOptions,
    select_works,
    split_of,
)
from refrain.training.corpus.degrade import apply_chain, describe, mp3_decode
from refrain.training.corpus.families import cataloged_melodies, select_families, write_table
from refrain.training.corpus.midi import Timeline, version_events, version_midi
from refrain.training.corpus.render import RenderError, find_soundfonts, render_midi
from refrain.training.corpus.tune import encode_frames, frame_count, tune_frames
from refrain.training.corpus.versions import (
    VersionOptions,
    VersionParams,
    performed_work,
    sample_version,
)
from refrain.training.corpus.works import Source, Work, WorkError, clique_id, load_work

T = TypeVar("T")
R = TypeVar("R")

MANIFEST_COLUMNS = (
    "clique",
    "path",
    "split",
    "work",
    "version",
    "soundfont",
    "transpose",
    "tempo",
    "program_set",
    "degradations",
    "duration_s",
)
PEAK = 0.89  # -1 dBFS: headroom for the codec
_FADE_S = 0.05


@dataclass(frozen=True)
class CorpusOptions:
    out: Path
    works: int | None = 200  # None: every acceptable work
    versions: int = 6  # per work
    seed: int = 0
    collection: str = "default"  # "default" or "bach-eval" (evaluation only)
    max_seconds: float = 180.0  # versions are cut at this length
    min_seconds: float = 20.0  # works shorter than this at their base tempo are skipped
    min_parts: int = 1  # works with fewer parts are skipped
    min_homophony: float = 0.0  # works whose top line is not a tune over chords are skipped
    min_family: int = 2  # bach-eval: tunes with fewer distinct harmonisations are skipped
    only_split: str | None = None  # render only the selected works of this split
    sample_rate: int = 16000
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, valid, test, by work
    soundfonts: tuple[str, ...] | None = None  # files or folders; None: the system's
    jobs: int = 1
    timeout_s: float = 300.0  # per FluidSynth render
    catalog: Path | None = None  # shared facts cache; default out/catalog.jsonl
    version_options: VersionOptions = field(default_factory=VersionOptions)


@dataclass
class Summary:
    rendered: int = 0
    skipped: int = 0  # already complete
    failed: list[str] = field(default_factory=list)
    works: int = 0
    rows: int = 0
    families: int = 0  # bach-eval: tunes (manifest cliques)


def default_catalog(out: Path) -> Path:
    """OUT/catalog.jsonl, or the catalogue.jsonl of a corpus rendered before the rename."""
    older = out / "catalogue.jsonl"
    return (
        older if older.exists() and not (out / "catalog.jsonl").exists() else out / "catalog.jsonl"
    )


def build_corpus(options: CorpusOptions, progress: bool = True) -> Summary:
    """Render (or complete) the corpus described by `options` and write its manifest."""
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    soundfonts = {p.name: p for p in find_soundfonts(options.soundfonts)}
    if not soundfonts:
        raise RenderError("no soundfont found (Debian: apt-get install fluid-soundfont-gm)")

    catalog = Catalog(options.catalog or default_catalog(out))
    tunes = options.collection == "bach-eval"
    select = SelectOptions(
        options.collection,
        options.min_seconds,
        min_parts=options.min_parts,
        min_homophony=options.min_homophony,
        dedupe=not tunes,
    )
    with tqdm(desc="selecting works", unit="source", disable=not progress) as bar:
        n = None if tunes else options.works
        selection = select_works(n, catalog, select, options.jobs, progress=bar.update)
    ids = [f.id for f in selection.works]
    families = None
    if tunes:  # --works counts tunes; every harmonisation of a chosen tune is rendered
        families = select_families(
            cataloged_melodies(catalog),
            ids,
            options.works,
            lambda some: _load_works(out, some, options.jobs),
            options.min_family,
            selection.rejected,
        )
        ids = families.ids
    if options.only_split is not None:
        ids = [i for i in ids if _split(i, options) == options.only_split]
    works = _load_works(out, ids, options.jobs)

    names = sorted(soundfonts)
    tasks, done, summary = [], [], Summary(works=len(works))
    for work in works:
        for k in range(options.versions):
            params = sample_version(work, k, options.seed, names, options.version_options)
            record = _complete_record(work, params, options)
            if record is not None:
                done.append(record)
            else:
                soundfont = str(soundfonts[params.soundfont])
                tasks.append(_Task(work.clique, params.to_json(), soundfont, options))
    summary.skipped = len(done)

    bar = tqdm(total=len(tasks), desc="rendering versions", unit="version", disable=not progress)
    pool = Pool(options.jobs) if options.jobs > 1 and len(tasks) > 1 else _Inline()
    with pool:
        for record, error in pool.imap_unordered(_render_task, tasks):
            bar.update(1)
            if error:
                summary.failed.append(error)
            else:
                assert record is not None  # a task without an error has its record
                done.append(record)
                summary.rendered += 1
    bar.close()

    split_names = {w.clique: _split(w.id, options) for w in works}
    family = {clique_id(m): f for m, f in families.family_of().items()} if families else None
    summary.families = len(families.families) if families else 0
    summary.rows = write_manifest(out, done, split_names, family)
    _write_summary(out, options, names, selection, summary)
    if families is not None:
        write_table(out, families)
    return summary


def _split(work_id: str, options: CorpusOptions) -> str:
    return "eval" if options.collection == "bach-eval" else split_of(work_id, options.splits)


class _Inline:
    """A stand-in for a pool of one process."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        return False

    def imap_unordered(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        return map(fn, items)


def _load_works(out: Path, ids: list[str], jobs: int) -> list[Work]:
    """The selected works, from their cached JSON or parsed again."""
    missing = [i for i in ids if not (out / "works" / f"{clique_id(i)}.json").exists()]
    if missing:
        pool = Pool(jobs) if jobs > 1 and len(missing) > 1 else _Inline()
        with pool:
            for work in pool.imap_unordered(_parse, missing):
                _write_atomic(
                    out / "works" / f"{work.clique}.json", json.dumps(work.to_json()).encode()
                )
    return [
        Work.from_json(json.loads((out / "works" / f"{clique_id(i)}.json").read_text()))
        for i in ids
    ]


def _parse(source_id: str) -> Work:
    path, _, tune = source_id.partition("#")
    try:
        return load_work(Source(path, int(tune or 0)))
    except WorkError as e:  # cataloged as readable, so the corpus files changed under us
        raise RuntimeError(f"work {source_id} no longer reads: {e}") from e


def _base(out: Path, clique: str, version: int) -> Path:
    return out / "audio" / clique / f"v{version:02d}"


def _complete_record(work: Work, params: VersionParams, options: CorpusOptions) -> dict | None:
    """The record of a version already rendered with these parameters, or None. A version
    rendered before tune labels gets its labels now: they need the notes, not the audio."""
    out = Path(options.out)
    record_path = _base(out, work.clique, params.version).with_suffix(".json")
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("params") != json.loads(json.dumps(params.to_json())):
        return None
    if not (out / record["path"]).exists():
        return None
    if "tune" not in record or not (out / record["tune"]).exists():  # none yet, or deleted
        samples = round(record["duration_s"] * record["sample_rate"])
        path = _base(out, work.clique, params.version).with_suffix(".tune.npy")
        _write_atomic(path, tune_labels(work, params, samples, options))
        record["tune"] = path.relative_to(out).as_posix()
        _write_atomic(record_path, json.dumps(record).encode())
    return record


def tune_labels(work: Work, params: VersionParams, samples: int, options: CorpusOptions) -> bytes:
    """The `.tune.npy` bytes of a version of `samples` samples."""
    events = version_events(work, params, options.max_seconds)
    return encode_frames(tune_frames(events, frame_count(samples, options.sample_rate)))


def render_version(
    work: Work, params: VersionParams, soundfont: str | os.PathLike, options: CorpusOptions
) -> tuple[np.ndarray, bytes | None]:
    """One version as float32 mono samples, and its MP3 bytes when it ends MP3-encoded."""
    sr = options.sample_rate
    midi = version_midi(work, params, options.max_seconds)
    with tempfile.TemporaryDirectory(prefix="refrain-midi-") as tmp:
        midi_path = Path(tmp) / "version.mid"
        midi.save(midi_path)
        audio = render_midi(midi_path, soundfont, sr, params.synth_effects, options.timeout_s)
    limit = int(options.max_seconds * sr)
    if len(audio) > limit:
        audio = audio[:limit]
        fade = int(_FADE_S * sr)
        audio[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    audio = _normalise(audio)
    audio, encoded = apply_chain(audio, sr, params.degradations, params.seed)
    if encoded is None:
        audio = _normalise(audio)
    return audio, encoded


def _normalise(x: np.ndarray) -> np.ndarray:
    peak = float(np.max(np.abs(x))) if len(x) else 0.0
    if peak == 0.0:
        raise RenderError("the rendering is silent")
    return (x * (PEAK / peak)).astype(np.float32)


@dataclass(frozen=True)
class _Task:
    clique: str
    params: dict  # VersionParams.to_json()
    soundfont: str  # path
    options: CorpusOptions


def _render_task(task: _Task) -> tuple[dict | None, str]:
    """Render, write and record one version; (record, "") or (None, what went wrong)."""
    out, clique, options = Path(task.options.out), task.clique, task.options
    params = VersionParams.from_json(task.params)
    try:
        work = Work.from_json(json.loads((out / "works" / f"{clique}.json").read_text()))
        audio, encoded = render_version(work, params, task.soundfont, options)
        base = _base(out, clique, params.version)
        base.parent.mkdir(parents=True, exist_ok=True)
        if encoded is not None:
            path = base.with_suffix(".mp3")
            _write_atomic(path, encoded)
            duration = len(mp3_decode(encoded)) / options.sample_rate
        else:
            path = base.with_suffix(".flac")
            _write_atomic(path, _flac_bytes(audio, options.sample_rate))
            duration = len(audio) / options.sample_rate
        tune = base.with_suffix(".tune.npy")
        _write_atomic(
            tune, tune_labels(work, params, round(duration * options.sample_rate), options)
        )
        for other in (base.with_suffix(".mp3"), base.with_suffix(".flac")):
            if other != path and other.exists():  # left by a run with other parameters
                other.unlink()
        record = {
            "clique": clique,
            "path": path.relative_to(out).as_posix(),
            "work": work.id,
            "title": work.title,
            "composer": work.composer,
            "version": params.version,
            "sample_rate": options.sample_rate,
            "duration_s": round(duration, 3),
            "expected_s": round(
                min(Timeline(performed_work(work, params), params).duration, options.max_seconds),
                3,
            ),
            "params": task.params,
            "tune": tune.relative_to(out).as_posix(),
        }
        _write_atomic(base.with_suffix(".json"), json.dumps(record).encode())
        return record, ""
    except (RenderError, OSError, ValueError) as e:
        return None, f"{clique} v{params.version} ({params.work}): {e}"


def _flac_bytes(audio: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), sr, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_manifest(
    out: Path, records: list[dict], splits: dict[str, str], family: dict[str, str] | None = None
) -> int:
    """Write manifest.csv and params.jsonl for `records`, sorted by clique, work and version.
    `family` maps a record's clique to the clique written in the manifest (bach-eval: the
    tune), recorded as `family` in params.jsonl."""
    family = family or {}

    def clique(r: dict) -> str:
        return family.get(r["clique"], r["clique"])

    records = sorted(records, key=lambda r: (clique(r), r["work"], r["version"]))
    rows = []
    for r in records:
        params = VersionParams.from_json(r["params"])
        rows.append(
            {
                "clique": clique(r),
                "path": r["path"],
                "split": splits[r["clique"]],
                "work": r["work"],
                "version": r["version"],
                "soundfont": params.soundfont,
                "transpose": params.transpose,
                "tempo": params.tempo,
                "program_set": params.program_set,
                "degradations": describe(params.degradations),
                "duration_s": r["duration_s"],
            }
        )
    text = _csv_text(rows)
    _write_atomic(out / "manifest.csv", text.encode())
    lines = [
        json.dumps({**r, "split": splits[r["clique"]], **({"family": clique(r)} if family else {})})
        + "\n"
        for r in records
    ]
    _write_atomic(out / "params.jsonl", "".join(lines).encode())
    return len(rows)


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _write_summary(
    out: Path, options: CorpusOptions, soundfonts: list[str], selection: Selection, summary: Summary
) -> None:
    reasons: dict[str, int] = {}
    for reason in selection.rejected.values():
        key = reason.split(" of ")[0] if reason.startswith(("duplicate", "melody")) else reason
        reasons[key] = reasons.get(key, 0) + 1
    opts = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}
    info = {
        "options": opts,
        "soundfonts": soundfonts,
        "works": summary.works,
        "versions": summary.rows,
        "failed": summary.failed,
        "skipped_sources": reasons,
        "skipped_examples": dict(list(selection.rejected.items())[:50]),
    }
    _write_atomic(out / "corpus.json", json.dumps(info, indent=1).encode())
