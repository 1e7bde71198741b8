"""The labelled CQT cache the tune-salience network trains on.

For every rendered version of one or more corpus folders (`refrain corpus render`, whose
records name the version's tune labels, `refrain.training.corpus.tune`), the cache keeps the
salience network's input (`refrain.model.salience.features`, one byte a bin: 84 bytes a frame
at 25 frames per second) and the tune's MIDI pitch at each of those frames (one byte). An hour
of audio takes 7.8 MB, so a cache of several hours travels with the code to a GPU host.

    refrain salience cache corpus-tunes corpus-tunes-test --out runs/salience/cache.npz

Each version is computed once into `<out>.parts/` (resumable: an interrupted build goes on
where it stopped), then all are packed into one `.npz`:

    feats   (frames, 84) uint8     every version's frames, one after the other
    labels  (frames,) uint8        the tune's MIDI pitch, 0 where it rests
    starts  (tracks + 1,) int64    where each version's frames start, then the end
    tracks  JSON lines             per version: corpus, path, clique, split, texture, soundfont
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

if TYPE_CHECKING:
    from refrain.model.sequence import Chromagram

TEXTURES = ("solo", "accompanied", "hymn")


def texture_of(record: dict) -> str:
    """What surrounds the tune in a version: "solo" (the tune alone), "hymn" (a four-part
    setting: a blended or hymn-textured arrangement, or three or more of a work's own parts
    moving together) or "accompanied" (the tune over an accompaniment)."""
    params = record["params"]
    arrangement = params.get("arrangement")
    if arrangement is not None:
        hymn = arrangement.get("blend") or arrangement.get("texture") == "hymn"
        return "hymn" if hymn else "accompanied"
    playing = [p for p in params["parts"] if not p["dropped"]]
    if len(playing) == 1 and params.get("drums") is None:
        return "solo"
    return "hymn" if len(playing) >= 3 and params.get("drums") is None else "accompanied"


def corpus_records(folder: Path) -> list[dict]:
    """The records of a corpus folder's rendered versions that have tune labels, each with its
    split: from params.jsonl when the render finished, else from the versions' own records
    (a render still under way), split by work as the render splits them."""
    from refrain.training.corpus.catalog import split_of

    if (folder / "params.jsonl").exists():
        lines = (folder / "params.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        return [r for r in records if "tune" in r]
    try:
        options = json.loads((folder / "corpus.json").read_text())["options"]
        splits, collection = tuple(options["splits"]), options["collection"]
    except (OSError, KeyError, ValueError):
        splits, collection = (0.8, 0.1, 0.1), "default"
    records = []
    for path in sorted((folder / "audio").glob("*/v*.json")):
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if "tune" in r and (folder / r["tune"]).exists():
            r["split"] = "eval" if collection == "bach-eval" else split_of(r["work"], splits)
            records.append(r)
    return records


@dataclass
class TuneCache:
    feats: np.ndarray  # (frames, 84) uint8
    labels: np.ndarray  # (frames,) uint8
    starts: np.ndarray  # (tracks + 1,) int64
    tracks: list[dict]

    def track(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.starts[k]), int(self.starts[k + 1])
        return self.feats[a:b], self.labels[a:b]

    def select(self, split: str | None = None, texture: str | None = None) -> list[int]:
        return [
            k
            for k, t in enumerate(self.tracks)
            if (split is None or t["split"] == split)
            and (texture is None or t["texture"] == texture)
        ]

    def hours(self, indices: Sequence[int] | None = None) -> float:
        lengths = np.diff(self.starts)
        chosen = lengths if indices is None else lengths[list(indices)]
        from refrain.model.salience import RATE

        return float(chosen.sum() / RATE / 3600)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TuneCache:
        with np.load(path, allow_pickle=False) as z:
            tracks = [json.loads(line) for line in bytes(z["tracks"]).decode().splitlines()]
            return cls(z["feats"], z["labels"], z["starts"], tracks)

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        text = "".join(json.dumps(t) + "\n" for t in self.tracks).encode()
        np.savez(
            tmp,
            feats=self.feats,
            labels=self.labels,
            starts=self.starts,
            tracks=np.frombuffer(text, dtype=np.uint8),
        )
        os.replace(tmp, path)


def version_arrays(
    audio_path: Path, tune_path: Path, chromagram: Chromagram
) -> tuple[np.ndarray, np.ndarray]:
    """One version's (features uint8 (frames, 84), labels uint8 (frames,))."""
    from refrain.model.audio import load_audio
    from refrain.model.salience import POOL, features, quantise
    from refrain.training.corpus.tune import decode_frames, fit_frames

    wave = load_audio(audio_path, 16000)
    cqt = chromagram.cqt(wave)
    feats = quantise(features(cqt)).T
    try:
        labels = decode_frames(tune_path.read_bytes())
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{tune_path}: unreadable tune labels ({e}); delete it and run the corpus's "
            "`refrain corpus render` again: it writes them from the notes"
        ) from e
    labels = fit_frames(labels, cqt.shape[1])
    labels = labels[: len(feats) * POOL : POOL]  # each salience frame's first CQT frame
    return np.ascontiguousarray(feats), fit_frames(labels, len(feats))


def build_cache(
    folders: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    splits: Sequence[str] | None = None,
    progress: bool = True,
) -> TuneCache:
    """Compute (or resume) the cache of every labelled version in `folders` (only `splits`
    when given) and write it to `out`."""
    from refrain.model.sequence import Chromagram

    out = Path(out)
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    todo = []
    for folder in map(Path, folders):
        for r in corpus_records(folder):
            if splits is None or r.get("split") in splits:
                todo.append((folder, r))
    chromagram = Chromagram()
    feats, labels, tracks = [], [], []
    for folder, r in tqdm(todo, desc="caching versions", unit="version", disable=not progress):
        key = f"{folder.name}-{r['path'].replace('/', '-')}.npz"
        part = parts / key
        if not part.exists():
            f, y = version_arrays(folder / r["path"], folder / r["tune"], chromagram)
            tmp = part.with_name(f".{key}.tmp.npz")
            np.savez(tmp, feats=f, labels=y)
            os.replace(tmp, part)
        with np.load(part) as z:
            feats.append(z["feats"])
            labels.append(z["labels"])
        tracks.append(
            {
                "corpus": folder.name,
                "path": r["path"],
                "clique": r["clique"],
                "split": r.get("split", ""),
                "texture": texture_of(r),
                "soundfont": r["params"]["soundfont"],
            }
        )
    lengths = [len(f) for f in feats]
    cache = TuneCache(
        np.concatenate(feats) if feats else np.zeros((0, 84), np.uint8),
        np.concatenate(labels) if labels else np.zeros(0, np.uint8),
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        tracks,
    )
    cache.save(out)
    return cache
