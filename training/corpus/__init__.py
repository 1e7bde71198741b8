"""The version corpus Refrain's default model is trained on.

Works are real compositions from music21's bundled corpus; each is rendered several times as
different versions (transposed, re-timed, re-orchestrated, rearranged, with drums, through
different soundfonts, then degraded as recordings are) so that the versions of one work form a
clique. The Bach chorales are reserved for evaluation and never enter the default selection.

    refrain corpus render --out data/corpus --works 200 --versions 6 --seed 0 --jobs 2
    refrain corpus render --out data/bach --collection bach-eval --works 0 --versions 2
    python -m refrain.training.corpus families         # the chorale tunes (bach-eval's cliques)
    python -m refrain.training.corpus works            # how many usable works there are

Needs the `train` extra (music21, mido) and the fluidsynth program with soundfonts.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from refrain.training.corpus.catalog import (
        BachGuard,
        Catalog,
        SelectOptions,
        select_works,
        split_of,
    )
    from refrain.training.corpus.commands import main
    from refrain.training.corpus.pipeline import (
        MANIFEST_COLUMNS,
        CorpusOptions,
        build_corpus,
        render_version,
    )
    from refrain.training.corpus.versions import VersionOptions, VersionParams, sample_version
    from refrain.training.corpus.works import Source, Work, list_sources, load_work

# the public names, imported on first use so that `refrain corpus -h` loads no corpus code
_EXPORTS = {
    **dict.fromkeys(
        ("BachGuard", "Catalog", "SelectOptions", "select_works", "split_of"),
        "refrain.training.corpus.catalog",
    ),
    "main": "refrain.training.corpus.commands",
    **dict.fromkeys(
        ("MANIFEST_COLUMNS", "CorpusOptions", "build_corpus", "render_version"),
        "refrain.training.corpus.pipeline",
    ),
    **dict.fromkeys(
        ("VersionOptions", "VersionParams", "sample_version"), "refrain.training.corpus.versions"
    ),
    **dict.fromkeys(
        ("Source", "Work", "list_sources", "load_work"), "refrain.training.corpus.works"
    ),
}

__all__ = [
    "MANIFEST_COLUMNS",
    "BachGuard",
    "Catalog",
    "CorpusOptions",
    "SelectOptions",
    "Source",
    "VersionOptions",
    "VersionParams",
    "Work",
    "build_corpus",
    "list_sources",
    "load_work",
    "main",
    "render_version",
    "sample_version",
    "select_works",
    "split_of",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'refrain.training.corpus' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
