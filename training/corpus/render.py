"""Rendering MIDI to audio with the FluidSynth command line, one soundfont per version."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

# Where Debian's soundfont packages install (fluid-soundfont-gm, timgm6mb-soundfont,
# musescore-general-soundfont*, fluidr3mono-gm-soundfont) and where others usually go.
SOUNDFONT_DIRS = (
    "/usr/share/sounds/sf2",
    "/usr/share/sounds/sf3",
    "/usr/share/soundfonts",
    "/usr/local/share/soundfonts",
)
_SUFFIXES = (".sf2", ".sf3")
_SETTINGS = {
    # Load only the samples a file plays: compressed .sf3 fonts otherwise take seconds to open.
    "synth.dynamic-sample-loading": 1,
    "synth.cpu-cores": 1,
    "synth.polyphony": 512,
}


class RenderError(RuntimeError):
    """FluidSynth failed, timed out or produced no audio."""


def fluidsynth_path() -> str:
    path = shutil.which("fluidsynth")
    if path is None:
        raise RenderError("fluidsynth not found on PATH (Debian: apt-get install fluidsynth)")
    return path


def find_soundfonts(paths: Sequence[str | os.PathLike] | None = None) -> list[Path]:
    """Soundfont files in `paths` (files or folders; the usual system folders when None),
    each file once however many links point at it, sorted by name."""
    candidates: list[Path] = []
    for entry in paths if paths is not None else SOUNDFONT_DIRS:
        entry = Path(entry)
        if entry.is_dir():
            candidates += [p for p in sorted(entry.iterdir()) if p.suffix.lower() in _SUFFIXES]
        elif entry.is_file():
            candidates.append(entry)
        elif paths is not None:
            raise FileNotFoundError(f"expected a soundfont file or folder, got {entry}")
    found: dict[Path, Path] = {}
    for p in candidates:
        real = p.resolve()
        if real.is_file():
            # The real file's name, not a link's ("default-GM.sf2" says nothing).
            found.setdefault(real, real)
    return sorted(found.values(), key=lambda p: p.name)


def render_midi(
    midi_path: str | os.PathLike,
    soundfont: str | os.PathLike,
    sample_rate: int,
    effects: bool,
    timeout_s: float = 300.0,
) -> np.ndarray:
    """Render a MIDI file; float32 mono samples at `sample_rate`."""
    with tempfile.TemporaryDirectory(prefix="refrain-render-") as tmp:
        wav = Path(tmp) / "out.wav"
        on = "1" if effects else "0"
        # No shell, no MIDI input, quiet; float WAV so that nothing is dithered or clipped.
        command = [fluidsynth_path(), "-ni", "-q", "-T", "wav", "-O", "float", "-g", "0.6"]
        command += ["-F", str(wav), "-r", str(sample_rate), "-R", on, "-C", on]
        for key, value in _SETTINGS.items():
            command += ["-o", f"{key}={value}"]
        command += [str(soundfont), str(midi_path)]
        try:
            result = subprocess.run(command, capture_output=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as e:
            raise RenderError(f"fluidsynth took more than {timeout_s:g} s on {midi_path}") from e
        if result.returncode != 0 or not wav.exists():
            stderr = result.stderr.decode(errors="replace").strip()[-500:]
            raise RenderError(
                f"fluidsynth failed on {midi_path} (rc {result.returncode}): {stderr}"
            )
        try:
            audio, rate = sf.read(wav, dtype="float32", always_2d=True)
        except sf.SoundFileError as e:
            raise RenderError(f"fluidsynth wrote unreadable audio for {midi_path}") from e
    if rate != sample_rate or len(audio) == 0:
        raise RenderError(f"fluidsynth wrote {len(audio)} samples at {rate} Hz for {midi_path}")
    return audio.mean(axis=1)
