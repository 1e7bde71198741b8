"""Command line: `refrain corpus render|works|harmony|families|bach-melodies ...`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from refrain.training.corpus.works import Work

# The corpus code (music21, tqdm) is imported inside each action, so that registering the
# actions on `refrain`'s parser and answering -h load none of it.

N = TypeVar("N", int, float)

COLLECTIONS = ("default", "bach-eval")
TUNE_HOMOPHONY = 0.65  # --tunes: most other parts start their notes with the top line's


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0 or sum(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected three fractions like 0.8,0.1,0.1, got {text!r}")
    return values


def _positive(kind: Callable[[str], N], zero: bool = False) -> Callable[[str], N]:
    def parse(text: str) -> N:
        value = kind(text)
        if value < 0 or (value == 0 and not zero):
            least = "zero or more" if zero else "a positive number"
            raise argparse.ArgumentTypeError(f"expected {least}, got {text!r}")
        return value

    return parse


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return value


DESCRIPTION = (
    "Synthetic version corpus from music21's bundled scores, rendered with FluidSynth. "
    "The Bach chorales are reserved for evaluation (--collection bach-eval)."
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """`refrain corpus ACTION ...`, registered on the `refrain` command's subparsers."""
    p = sub.add_parser(
        "corpus", help="build and inspect the synthetic version corpus", description=DESCRIPTION
    )
    add_actions(p)


def parser() -> argparse.ArgumentParser:
    """The same actions on their own (`python -m refrain.training.corpus`)."""
    p = argparse.ArgumentParser(prog="refrain corpus", description=DESCRIPTION)
    add_actions(p)
    return p


def add_actions(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="corpus_command", required=True, metavar="ACTION")

    r = sub.add_parser("render", help="render (or complete) a corpus into a folder")
    r.add_argument("--out", type=Path, required=True, help="output folder")
    r.add_argument(
        "--works",
        type=_positive(int, zero=True),
        default=200,
        help="number of works (bach-eval: of chorale tunes); 0 for all",
    )
    r.add_argument(
        "--versions",
        type=_positive(int),
        default=6,
        help="versions per work (bach-eval: per harmonisation of a tune)",
    )
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--jobs", type=_positive(int), default=1, help="parallel processes")
    r.add_argument("--collection", choices=COLLECTIONS, default="default")
    r.add_argument(
        "--min-family",
        type=_positive(int),
        default=2,
        help="bach-eval: skip tunes with fewer distinct harmonisations (1 keeps them all)",
    )
    r.add_argument(
        "--max-seconds",
        type=_positive(float),
        default=180.0,
        help="cut every version at this length",
    )
    r.add_argument(
        "--min-seconds",
        type=_positive(float, zero=True),
        default=20.0,
        help="skip works shorter than this at their base tempo",
    )
    r.add_argument(
        "--min-parts",
        type=_positive(int),
        default=1,
        help="skip works with fewer parts (3: part-writing only)",
    )
    r.add_argument(
        "--tunes",
        action="store_true",
        help="only works whose top line is a tune (one line, or parts moving with it)",
    )
    r.add_argument(
        "--arrange",
        type=_probability,
        default=0.0,
        help="chance that a version is a new arrangement of the tune (harmony, texture, groove)",
    )
    r.add_argument(
        "--blend",
        type=_probability,
        default=0.0,
        help="chance that an arranged version is a blended four-part setting: the tune on top "
        "of hymn chords, every part voiced alike (no lead instrument)",
    )
    r.add_argument(
        "--even",
        type=_probability,
        default=0.0,
        help="chance that an arranged version re-times the tune a beat per note, as a hymn "
        "tune is sung (its own rhythm no longer tells it apart, only its pitches)",
    )
    r.add_argument(
        "--originals",
        type=_positive(int, zero=True),
        default=1,
        help="the first N versions of every work keep its own parts (with --arrange)",
    )
    r.add_argument(
        "--only-split",
        choices=("train", "valid", "test"),
        default=None,
        help="render only the selected works of one split (e.g. a test set to evaluate on)",
    )
    r.add_argument("--sample-rate", type=int, default=16000, choices=(16000, 22050, 24000))
    r.add_argument(
        "--splits",
        type=_fractions,
        default=(0.8, 0.1, 0.1),
        help="train,valid,test fractions (by work)",
    )
    r.add_argument(
        "--soundfont",
        action="append",
        default=None,
        help="soundfont file or folder (repeatable); default: the system's",
    )
    r.add_argument(
        "--catalog",
        "--catalogue",
        type=Path,
        default=None,
        help="facts cache shared between corpora (default OUT/catalog.jsonl)",
    )
    r.add_argument(
        "--timeout",
        type=_positive(float),
        default=300.0,
        help="seconds allowed per FluidSynth render",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=_render)

    w = sub.add_parser("works", help="count (or list) the usable works of a collection")
    w.add_argument("--collection", choices=COLLECTIONS, default="default")
    w.add_argument(
        "--catalog", "--catalogue", type=Path, default=None, help="facts cache to use and extend"
    )
    w.add_argument("--min-seconds", type=_positive(float, zero=True), default=20.0)
    w.add_argument("--min-parts", type=_positive(int), default=1)
    w.add_argument("--jobs", type=_positive(int), default=1)
    w.add_argument("--list", action="store_true", help="print every usable work")
    w.set_defaults(func=_works)

    h = sub.add_parser(
        "harmony", help="how much the harmonisations of a corpus's arranged versions differ"
    )
    h.add_argument("corpus", type=Path, help="a corpus folder rendered with --arrange")
    h.add_argument("--json", type=Path, default=None, help="also write the figures here")
    h.set_defaults(func=_harmony)

    f = sub.add_parser("families", help="print the Bach chorale tunes and their harmonisations")
    f.add_argument(
        "--catalog", "--catalogue", type=Path, default=None, help="facts cache to use and extend"
    )
    f.add_argument("--min-family", type=_positive(int), default=2)
    f.add_argument("--jobs", type=_positive(int), default=1)
    f.add_argument("--json", type=Path, default=None, help="also write the table here")
    f.set_defaults(func=_families)

    b = sub.add_parser("bach-melodies", help="rebuild the chorale melodies the Bach guard uses")
    b.add_argument("output", type=Path)
    b.add_argument(
        "--catalog", "--catalogue", type=Path, default=None, help="facts cache to use and extend"
    )
    b.set_defaults(func=_bach_melodies)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args) or 0)


def _render(args: argparse.Namespace) -> int:
    from refrain.training.corpus.pipeline import CorpusOptions, build_corpus
    from refrain.training.corpus.render import RenderError
    from refrain.training.corpus.versions import VersionOptions

    options = CorpusOptions(
        out=args.out,
        works=args.works or None,
        versions=args.versions,
        seed=args.seed,
        collection=args.collection,
        max_seconds=args.max_seconds,
        min_seconds=args.min_seconds,
        min_parts=args.min_parts,
        min_homophony=TUNE_HOMOPHONY if args.tunes else 0.0,
        min_family=args.min_family,
        only_split=args.only_split,
        sample_rate=args.sample_rate,
        splits=args.splits,
        soundfonts=tuple(args.soundfont) if args.soundfont else None,
        jobs=args.jobs,
        timeout_s=args.timeout,
        catalog=args.catalog,
        version_options=VersionOptions(
            arrange=args.arrange, originals=args.originals, blend=args.blend, even=args.even
        ),
    )
    start = time.monotonic()
    try:
        summary = build_corpus(options, progress=not args.quiet)
    except (RenderError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tunes = f"{summary.families} tunes, " if args.collection == "bach-eval" else ""
    print(
        f"{tunes}{summary.works} works, {summary.rows} versions in {args.out / 'manifest.csv'} "
        f"({summary.rendered} rendered, {summary.skipped} already there, "
        f"{len(summary.failed)} failed) in {time.monotonic() - start:.0f} s"
    )
    found = summary.families if args.collection == "bach-eval" else summary.works
    if args.works and found < args.works and not args.only_split:
        kind = "tunes" if args.collection == "bach-eval" else "works"
        print(f"only {found} usable {kind} in {args.collection!r}", file=sys.stderr)
    for failure in summary.failed:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if summary.failed else 0


def _works(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from refrain.training.corpus.catalog import Catalog, SelectOptions, select_works

    catalog = Catalog(args.catalog)
    options = SelectOptions(args.collection, args.min_seconds, min_parts=args.min_parts)
    with tqdm(desc="reading works", unit="source", disable=args.list) as bar:
        selection = select_works(None, catalog, options, args.jobs, progress=bar.update)
    by_collection = Counter(f.id.split("/", 1)[0] for f in selection.works)
    reasons = Counter(r.split(" of ")[0] for r in selection.rejected.values())
    if args.list:
        for f in selection.works:
            print(f"{f.id}\t{f.seconds:.1f}\t{f.title}")
    print(f"{len(selection.works)} usable works in collection {args.collection!r}")
    for name, count in sorted(by_collection.items()):
        print(f"  {name:24s} {count}")
    print("skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
    return 0


def _harmony(args: argparse.Namespace) -> int:
    from refrain.training.corpus.report import harmony_report

    try:
        report = harmony_report(args.corpus)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_json(), indent=1) + "\n")
    return 0


def _families(args: argparse.Namespace) -> int:
    from multiprocessing import Pool

    from tqdm import tqdm

    from refrain.training.corpus.catalog import Catalog, SelectOptions, select_works
    from refrain.training.corpus.families import (
        cataloged_melodies,
        format_table,
        select_families,
        table,
    )
    from refrain.training.corpus.works import Source, load_work

    catalog = Catalog(args.catalog)
    options = SelectOptions("bach-eval", dedupe=False)
    with tqdm(desc="reading chorales", unit="source") as bar:
        selection = select_works(None, catalog, options, args.jobs, progress=bar.update)

    def load(ids: list[str]) -> list[Work]:
        if args.jobs > 1:
            with Pool(args.jobs) as pool:
                return pool.map(load_work, [Source(i) for i in ids])
        return [load_work(Source(i)) for i in ids]

    accepted = [f.id for f in selection.works]
    tunes = select_families(cataloged_melodies(catalog), accepted, None, load, args.min_family)
    print(format_table(tunes))
    print(
        f"{len(tunes.families)} tunes with at least {args.min_family} harmonisations, "
        f"{len(tunes.ids)} harmonisations, from {len(accepted)} chorale files "
        f"({tunes.singles} tunes with fewer)"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(table(tunes), indent=1, ensure_ascii=False) + "\n")
    return 0


def _bach_melodies(args: argparse.Namespace) -> int:
    from refrain.training.corpus.catalog import BachGuard, Catalog, facts_of, reader_version
    from refrain.training.corpus.works import list_sources

    catalog = Catalog(args.catalog)
    sources = list_sources("bach-eval")
    catalog.add(facts_of(s) for s in sources if catalog.get(s.id) is None)
    cataloged = []
    for s in sources:
        facts = catalog.get(s.id)
        assert facts is not None  # added just above
        cataloged.append(facts)
    guard = BachGuard.from_facts(cataloged)
    data = {"reader": reader_version(), "melodies": guard.melodies}
    args.output.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"{len(guard.melodies)} chorale melodies written to {args.output}")
    return 0
