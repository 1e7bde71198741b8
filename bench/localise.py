"""Localisation: where in a reference does a clip match, to the second, at what tempo?

References are random melodies over random chords (nothing repeats, so every clip has one
true place), written as MIDI with mido and rendered with FluidSynth. Clips of `--clip-s`
seconds are cut at random offsets from four renderings of each reference's MIDI: as it is,
at 0.93x and 1.08x tempo (the notes' times scaled, pitch kept) and 2 semitones up. Each
clip is searched through the service's core (`Engine.search`, alignment verification on),
and the top hit's best match is compared with the truth:

    ok = top hit is the source, the reference range starts and ends within 1.5 s of the
         true span, and the tempo ratio is within 3 % of the truth

    python bench/localise.py --references 12 --clips 2 [--json out.json]

Needs fluidsynth, a GM soundfont and the train extra (mido).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VARIANTS = {"as is": (1.0, 0), "tempo x0.93": (0.93, 0), "tempo x1.08": (1.08, 0), "+2": (1.0, 2)}
TOLERANCE_S = 1.5
TEMPO_TOLERANCE = 0.03
_SCALE = np.array([0, 2, 4, 5, 7, 9, 11])
_CHORDS = [(0, 4, 7), (5, 9, 12), (7, 11, 14), (9, 12, 16), (2, 5, 9), (4, 7, 11)]


def random_piece(rng: np.random.Generator, seconds: float) -> list[tuple[float, float, int, int]]:
    """(start s, end s, channel, pitch) notes: a melody over a chord every 2 s and a bass,
    drawn afresh all the way (no section repeats)."""
    notes = []
    root = int(rng.integers(55, 62))
    t = 0.0
    while t < seconds:
        chord = _CHORDS[int(rng.integers(len(_CHORDS)))]
        for p in chord:
            notes.append((t, t + 2.0, 1, root - 12 + p))
        notes.append((t, t + 1.0, 2, root - 24 + chord[0]))
        notes.append((t + 1.0, t + 2.0, 2, root - 24 + chord[int(rng.integers(1, 3))]))
        t += 2.0
    t, degree = 0.0, int(rng.integers(7, 11))
    while t < seconds:
        length = float(rng.choice([0.25, 0.5, 0.5, 0.75, 1.0]))
        degree = int(np.clip(degree + rng.integers(-3, 4), 3, 16))
        pitch = root + 12 * (degree // 7) + int(_SCALE[degree % 7])
        notes.append((t, t + length * 0.95, 0, pitch))
        t += length
    return [n for n in notes if n[0] < seconds]


def write_midi(notes, path: Path, tempo: float = 1.0, transpose: int = 0) -> None:
    """The notes as a MIDI file, times divided by `tempo`, pitches shifted by `transpose`."""
    import mido

    ticks_per_s = 960  # 480 per quarter at 120 quarters per minute
    mid = mido.MidiFile(ticks_per_beat=480)
    track = mido.MidiTrack()
    mid.tracks.append(track)
    for channel, program in ((0, 73), (1, 0), (2, 32)):  # flute, piano, bass
        track.append(mido.Message("program_change", channel=channel, program=program))
    events = []
    for start, end, channel, pitch in notes:
        p = pitch + transpose
        velocity = 100 if channel == 0 else 70
        events.append(
            (start / tempo, 1, mido.Message("note_on", channel=channel, note=p, velocity=velocity))
        )
        events.append((end / tempo, 0, mido.Message("note_off", channel=channel, note=p)))
    events.sort(key=lambda e: (e[0], e[1]))
    now = 0
    for seconds, _, message in events:
        tick = round(seconds * ticks_per_s)
        track.append(message.copy(time=tick - now))
        now = tick
    mid.save(path)


@dataclass(frozen=True)
class Clip:
    reference: str
    variant: str
    wave: np.ndarray
    ref_start_s: float  # the true span in the reference
    ref_end_s: float
    tempo_ratio: float  # reference seconds per clip second


def make_set(
    n_references: int, clips_per_variant: int, clip_s: float, ref_s: float, seed: int, out: Path
) -> tuple[dict[str, np.ndarray], list[Clip]]:
    """Rendered references (id -> samples at 16 kHz) and clips cut from their variants."""
    from refrain.training.corpus.render import find_soundfonts, render_midi

    soundfont = next(p for p in find_soundfonts() if p.name.startswith("FluidR3"))
    rng = np.random.default_rng(seed)
    rate = 16000
    refs, clips = {}, []
    for r in range(n_references):
        notes = random_piece(rng, ref_s)
        name = f"ref{r:03d}"
        for variant, (tempo, transpose) in VARIANTS.items():
            midi = out / f"{name}-{tempo}-{transpose}.mid"
            write_midi(notes, midi, tempo, transpose)
            wave = render_midi(midi, soundfont, rate, effects=False)
            if variant == "as is":
                refs[name] = wave[: int(ref_s * rate)]
            for _ in range(clips_per_variant):
                # the clip's span in the reference: [t0, t0 + clip_s * tempo_ratio]
                ratio = tempo
                t0 = float(rng.uniform(2.0, ref_s - clip_s * ratio - 2.0))
                a = int(t0 / ratio * rate)
                clips.append(
                    Clip(
                        name,
                        variant,
                        wave[a : a + int(clip_s * rate)],
                        t0,
                        t0 + clip_s * ratio,
                        ratio,
                    )
                )
    return refs, clips


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--references", type=int, default=12)
    ap.add_argument("--clips", type=int, default=2, help="clips per reference and variant")
    ap.add_argument("--clip-s", type=float, default=10.0)
    ap.add_argument("--reference-s", type=float, default=90.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import io

    import soundfile as sf

    from refrain.index import open_index
    from refrain.model.embedder import load_model
    from refrain.service.engine import Engine, SearchRequest, TrackMeta
    from refrain.service.metrics import Metrics
    from refrain.service.settings import Settings
    from refrain.service.worker import InferenceWorker

    def wav(x: np.ndarray) -> bytes:
        buf = io.BytesIO()
        sf.write(buf, x, 16000, format="WAV", subtype="FLOAT")
        return buf.getvalue()

    with tempfile.TemporaryDirectory(prefix="refrain-localise-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        refs, clips = make_set(
            args.references, args.clips, args.clip_s, args.reference_s, args.seed, tmp
        )
        print(
            f"rendered {len(refs)} references and {len(clips)} clips "
            f"in {time.perf_counter() - t:.0f} s"
        )
        model, metrics = load_model(), Metrics()
        worker = InferenceWorker(model, metrics)
        settings = Settings(data_dir=tmp)
        with open_index(tmp / "index", {"zdim": model.zdim, "bench": "localise"}) as ix:
            engine = Engine(settings, model, ix, worker, metrics)
            for name, wave in refs.items():
                engine.add_reference(wav(wave), TrackMeta(track_id=name))
            latency, chroma_s = [], []
            rows = []
            for clip in clips:
                result = engine.search(SearchRequest(wav(clip.wave), top_k=10))
                chroma_s.append(result.timings_s.get("chroma", 0.0))
                latency.append(result.timings_s.get("verify", 0.0) + chroma_s[-1])
                top = result.hits[0] if result.hits else None
                m = top.matches[0] if top and top.matches else None
                found = top is not None and top.track.track_id == clip.reference
                start_err = abs(m.ref_start_s - clip.ref_start_s) if m else None
                end_err = abs(m.ref_end_s - clip.ref_end_s) if m else None
                tempo = getattr(m, "tempo_ratio", None) if m else None
                tempo_err = abs(tempo / clip.tempo_ratio - 1) if tempo else None
                ok = bool(
                    found
                    and start_err is not None
                    and max(start_err, end_err) <= TOLERANCE_S
                    and tempo_err is not None
                    and tempo_err <= TEMPO_TOLERANCE
                )
                rows.append(
                    {
                        "reference": clip.reference,
                        "variant": clip.variant,
                        "found": found,
                        "start_error_s": start_err,
                        "end_error_s": end_err,
                        "tempo_error": tempo_err,
                        "ok": ok,
                    }
                )
    print(
        f"{'variant':<12} {'clips':>5} {'top-1':>6} {'located':>8} "
        f"{'med start err':>14} {'med tempo err':>14}"
    )
    for variant in [*VARIANTS, "all"]:
        sel = [r for r in rows if variant == "all" or r["variant"] == variant]
        errs = [r["start_error_s"] for r in sel if r["start_error_s"] is not None]
        terrs = [r["tempo_error"] for r in sel if r["tempo_error"] is not None]
        print(
            f"{variant:<12} {len(sel):>5} {np.mean([r['found'] for r in sel]):>6.0%} "
            f"{np.mean([r['ok'] for r in sel]):>8.0%} "
            f"{np.median(errs) if errs else float('nan'):>13.2f}s "
            f"{np.median(terrs) if terrs else float('nan'):>13.1%}"
        )
        worker.close()
    print(
        "verification (chroma, alignment, localisation): "
        f"median {1000 * np.median(latency):.1f} ms per query, top 10 "
        f"(the query's chroma: {1000 * np.median(chroma_s):.1f} ms)"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
