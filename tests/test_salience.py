"""The tune-salience network, the tune chroma in stored sequences, and verification on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refrain.model import sequence
from refrain.model.salience import (
    BINS,
    LOWEST_MIDI,
    POOL,
    SalienceNet,
    TuneSalience,
    default_salience,
    features,
    melody_of,
    save,
    tune_chroma,
)

SR = 16000


def _tone(midis: list[int], seconds: float = 0.5, partials: int = 5) -> np.ndarray:
    """Harmonic tones one after another."""
    t = np.arange(int(seconds * SR)) / SR
    out = []
    for m in midis:
        f = 440.0 * 2 ** ((m - 69) / 12)
        x = sum(np.sin(2 * np.pi * f * k * t) / k for k in range(1, partials + 1) if f * k < 7900)
        out.append(x * np.hanning(len(t)) ** 0.2)
    return (0.3 * np.concatenate(out)).astype(np.float32)


def test_features_are_pooled_pairs_in_a_fixed_decibel_range():
    cqt = np.random.default_rng(0).random((BINS, 101)).astype(np.float32)
    f = features(cqt)
    assert f.shape == (BINS, 50) and float(f.max()) == pytest.approx(1.0)
    assert float(f.min()) >= 0.0
    louder = features(cqt * 10)  # the level does not matter, only the shape
    assert torch.allclose(f, louder, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        features(np.zeros((12, 10)))


def test_the_network_gives_85_answers_per_frame_and_round_trips(tmp_path):
    net = SalienceNet().eval()
    x = torch.rand(2, BINS, 40)
    with torch.inference_mode():
        y = net(x)
    assert y.shape == (2, 40, BINS + 1)
    save(net, tmp_path / "s")
    loaded = TuneSalience(tmp_path / "s")
    with torch.inference_mode():
        assert torch.allclose(loaded.net(x), y, atol=1e-6)


def test_melody_and_chroma_read_the_probabilities():
    probs = np.zeros((6, BINS + 1), np.float32)
    probs[:3, 0] = 1.0  # rests
    probs[3:, 1 + 67 - LOWEST_MIDI] = 0.9  # G4
    probs[3:, 0] = 0.1
    assert melody_of(probs).tolist() == [0, 0, 0, 67, 67, 67]
    chroma = tune_chroma(probs, 3)
    assert chroma.shape == (2, 12)
    assert chroma[0].max() == 0.0 and chroma[1].argmax() == 7


def test_the_shipped_network_hears_a_tune_over_chords():
    """The shipped network on audio it never saw: a rising tune of harmonic tones above a
    sustained low chord; its contour follows the tune, not the chord."""
    from refrain.model.sequence import Chromagram

    tune = [72, 74, 76, 77, 79, 77, 76, 74]
    melody = _tone(tune)
    chord = sum(_tone([m], seconds=4.0, partials=3) for m in (48, 55, 60)) * 0.6
    wave = melody + chord[: len(melody)]
    cqt = Chromagram(tune=False).cqt(wave)
    salience = default_salience()
    contour = melody_of(salience.probabilities(cqt))
    frames = len(contour) // len(tune)
    heard = [np.median(contour[k * frames + 3 : (k + 1) * frames - 3]) for k in range(len(tune))]
    assert np.mean(np.array(heard) % 12 == np.array(tune) % 12) >= 0.75, heard


def test_sequences_hold_the_tune_and_older_ones_still_decode():
    rng = np.random.default_rng(1)
    full, upper, tune = (rng.random((7, 12)).astype(np.float32) for _ in range(3))
    contour = np.array([0, 60, 60.4, 61, 0, 72, 72, 0], np.float32)  # 7 frames at 2/s: 3.5 s
    data = sequence.encode(full, upper, tune, contour)
    assert data.startswith(sequence.HEADER_TUNE)
    assert len(data) == sequence.sequence_bytes(7, 1.4) == 12 + 4 + 3 * 7 * 12 + 8
    assert sequence.decode_contour(data).tolist() == [0, 60, 60, 61, 0, 72, 72, 0]
    f, u, t = sequence.decode_all(data)
    assert np.allclose(f, full, atol=1 / 255) and np.allclose(t, tune, atol=1 / 255)
    assert u is not None and np.allclose(u, upper, atol=1 / 255)
    two = sequence.encode(full, upper)  # the previous version's format
    assert sequence.decode_tune(two) is None and sequence.decode_upper(two) is not None
    one = sequence.encode(full)  # the first version's
    assert sequence.decode_all(one)[1:] == (None, None)
    assert sequence.decode_contour(two) is None
    with pytest.raises(ValueError, match="upper"):
        sequence.encode(full, None, tune, contour)
    with pytest.raises(ValueError, match="contour"):
        sequence.encode(full, upper, tune)
    with pytest.raises(ValueError, match="holds"):
        sequence.decode_all(sequence.HEADER_TUNE + b"\x09\0\0\0" + b"\0" * 30)


def test_a_query_and_a_reference_carry_the_tune_chroma():
    wave = _tone([60, 64, 67, 72] * 3)
    chromagram = sequence.Chromagram()
    query = chromagram.query(wave)
    assert query.tune is not None and query.tune.shape == query.upper.shape
    reference = chromagram.reference(wave)
    assert sequence.decode_tune(reference) is not None
    assert sequence.Chromagram(tune=False).query(wave).tune is None


def test_qmax_on_the_tune_chroma_is_a_baseline_and_keeps_older_settings():
    from refrain.model.qmax import QmaxParams

    assert "tune" not in QmaxParams().to_dict()  # settings read before the tune chroma
    assert sequence.TUNE.to_dict()["tune"] is True
    assert POOL == 2


class _Sequences:
    """The one part of a store that verification reads."""

    def __init__(self, stored: dict[str, bytes]) -> None:
        self.stored = stored

    def sequences(self, track_ids: list[str]) -> dict[str, bytes]:
        return {t: self.stored[t] for t in track_ids if t in self.stored}


def test_verification_aligns_on_the_tune_when_both_sides_hold_it():
    """A reference stored with the tune chroma is scored on it, an older one on the upper
    chroma; both are in the fused order."""
    from refrain.search.fusion import Fusion
    from refrain.search.verification import Verification

    chromagram = sequence.Chromagram()
    wave = _tone([60, 62, 64, 65, 67, 65, 64, 62] * 2)
    other = _tone([70, 66, 61, 69, 63, 68, 60, 71] * 2)
    params = (sequence.QmaxParams(), sequence.UPPER)
    full, upper = chromagram.sequences(other, (sequence.SEQUENCE_RATE,) * 2, params)
    store = _Sequences({"same": chromagram.reference(wave), "older": sequence.encode(full, upper)})
    query = chromagram.query(wave)
    v = Verification(
        store,  # type: ignore[arg-type]
        ["older", "same"],
        [0.5, 0.5],
        query.chroma,
        query.fine,
        Fusion(2, 2.4, 0.0),
        query.upper,
        query.tune,
    )
    assert set(v.qmax) == {"same", "older"}
    assert v.order[0] == "same" and v.qmax["same"] > v.qmax["older"]
