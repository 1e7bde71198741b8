"""Figures about a rendered corpus's arrangements: how far apart the harmonisations of two
versions of one work are, and how well each harmonisation fits its tune."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refrain.training.corpus.arrange import Arrangement, chord_difference, grid_of, harmonisation
from refrain.training.corpus.works import Work

_QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


@dataclass
class HarmonyReport:
    works: int
    pairs: list[float]  # share of beats with different chords, per pair of arranged versions
    fit: list[float]  # share of the tune's on-beat notes that are chord tones, per version

    def quantiles(self, values: list[float]) -> dict[str, float]:
        if not values:
            return {}
        q = np.quantile(values, _QUANTILES)
        return {f"q{int(100 * k)}": round(float(v), 3) for k, v in zip(_QUANTILES, q, strict=False)}

    def summary(self) -> str:
        lines = [f"{self.works} works, {len(self.pairs)} pairs of arranged versions"]
        for name, values in (
            ("beats with another chord", self.pairs),
            ("tune notes on the beat that are chord tones", self.fit),
        ):
            if values:
                q = self.quantiles(values)
                lines.append(
                    f"{name}: mean {np.mean(values):.3f}, "
                    + ", ".join(f"{k} {v:.3f}" for k, v in q.items())
                )
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "works": self.works,
            "pairs": len(self.pairs),
            "chord_difference": {
                "mean": float(np.mean(self.pairs)) if self.pairs else None,
                **self.quantiles(self.pairs),
            },
            "chord_tone_fit": {
                "mean": float(np.mean(self.fit)) if self.fit else None,
                **self.quantiles(self.fit),
            },
        }


def tune_fit(work: Work, arrangement: Arrangement) -> float:
    """Share of the tune's notes starting on a chord change whose pitch class is in the chord."""
    grid = grid_of(work, arrangement)
    tune, _, slots = harmonisation(grid, arrangement, np.random.default_rng(arrangement.seed))
    starts = {round(s.start, 6): s.chord.pitch_classes for s in slots}
    hits = [
        pitch % 12 in starts[round(onset, 6)]
        for onset, _, pitch, _ in tune
        if round(onset, 6) in starts
    ]
    return float(np.mean(hits)) if hits else 1.0


def harmony_report(corpus: str | Path) -> HarmonyReport:
    """Every pair of arranged versions of every work in `corpus` (its params.jsonl)."""
    corpus = Path(corpus)
    path = corpus / "params.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no params.jsonl in {corpus}: render the corpus first")
    by_work: dict[str, list[Arrangement]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        a = record["params"].get("arrangement")
        if a is not None:
            by_work.setdefault(record["clique"], []).append(Arrangement.from_json(a))
    pairs, fit = [], []
    for clique, arrangements in sorted(by_work.items()):
        work = Work.from_json(json.loads((corpus / "works" / f"{clique}.json").read_text()))
        fit += [tune_fit(work, a) for a in arrangements]
        pairs += [chord_difference(work, a, b) for a, b in itertools.combinations(arrangements, 2)]
    return HarmonyReport(len(by_work), pairs, fit)
