"""Stored chroma sequences: both chromas in one record, an older version's sequence still read,
and the upper chroma following a tune over a louder bass on synthesised audio."""

import numpy as np
import pytest

from refrain.model.qmax import QmaxParams, fold_chroma
from refrain.model.sequence import (
    BINS,
    HEADER,
    SEQUENCE_RATE,
    UPPER,
    Chromagram,
    decode,
    decode_upper,
    encode,
)


def _chroma(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.random((n, BINS)).astype(np.float32)
    return x / x.max(1, keepdims=True)


def test_both_chromas_round_trip_and_an_older_sequence_reads_as_the_full_chroma():
    rng = np.random.default_rng(0)
    full, upper = _chroma(rng, 9), _chroma(rng, 9)
    data = encode(full, upper)
    assert data.startswith(HEADER) and len(data) == 12 + 2 * 9 * 12
    np.testing.assert_allclose(decode(data), full, atol=0.5 / 255)
    np.testing.assert_allclose(decode_upper(data), upper, atol=0.5 / 255)
    older = encode(full)  # the full chroma alone, as earlier versions stored it
    assert len(older) == 9 * 12 and decode_upper(older) is None
    np.testing.assert_array_equal(decode(older), decode(data))
    # every frame of a stored chroma holds a 255 (scaled to a maximum of 1) or is silent (all
    # zeros), and the header is neither: no older sequence starts like a new one
    assert min(HEADER) > 0 and max(HEADER) < 255 and decode(older).max(1).min() == 1.0
    silent = encode(np.zeros((3, BINS), dtype=np.float32))
    assert decode_upper(silent) is None and not decode(silent).any()


def test_malformed_sequences_are_refused():
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match="same frames"):
        encode(_chroma(rng, 4), _chroma(rng, 5))
    with pytest.raises(ValueError, match="shape"):
        encode(np.zeros((4, 11)))
    with pytest.raises(ValueError, match="multiple of 24"):
        decode(HEADER + bytes(36))
    with pytest.raises(ValueError, match="multiple of 12"):
        decode_upper(bytes(13))


def test_fold_leaves_out_the_low_bins_and_raises_the_magnitudes():
    cqt = np.zeros((84, 50), dtype=np.float32)
    cqt[7] = 4.0  # G1: below C4
    cqt[36] = 1.0  # C4
    cqt[40] = 0.5  # E4
    full = fold_chroma(cqt, 25)
    assert full.shape == (2, 12) and np.all(full.argmax(1) == 7)
    upper = fold_chroma(cqt, 25, lowest_bin=36, power=1.5)
    np.testing.assert_allclose(upper[:, [0, 4, 7]], [[1.0, 0.5**1.5, 0.0]] * 2, rtol=1e-6)
    with pytest.raises(ValueError, match="lowest_bin"):
        QmaxParams(lowest_bin=-1)
    with pytest.raises(ValueError, match="power"):
        QmaxParams(power=0.0)


def _tone(f: float, seconds: float, sr: int, amp: float) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return amp * np.sin(2 * np.pi * f * t)


def test_the_upper_chroma_follows_a_tune_over_a_louder_bass():
    """A tune C5-E5-G5-A5 (one note a second) over a held G2 three times as loud: the full
    chroma hears the bass in every frame, the upper chroma hears the tune, note for note, in
    what a reference stores and a query carries alike."""
    chromagram = Chromagram()
    sr = chromagram.config.sample_rate
    notes = [523.25, 659.26, 783.99, 880.0]  # C5 E5 G5 A5: pitch classes 0, 4, 7, 9
    tune = np.concatenate([_tone(f, 1.0, sr, 0.2) for f in notes])
    wave = (tune + _tone(98.0, 4.0, sr, 0.6)).astype(np.float32)
    data = chromagram.reference(wave)
    full, upper = decode(data), decode_upper(data)
    assert upper is not None and len(full) == len(upper) == 4 * SEQUENCE_RATE
    assert list(full.argmax(1)) == [7] * 8  # G, the bass
    assert list(upper.argmax(1)) == [0, 0, 4, 4, 7, 7, 9, 9]
    query = chromagram.query(wave)
    np.testing.assert_array_equal(query.chroma, full)
    np.testing.assert_array_equal(query.upper, upper)
    assert len(query.fine) == 40


def test_the_query_sequences_match_what_the_service_stores():
    rng = np.random.default_rng(3)
    chromagram = Chromagram()
    wave = rng.standard_normal(3 * chromagram.config.sample_rate).astype(np.float32)
    full, upper = chromagram.sequences(wave, (SEQUENCE_RATE,) * 2, (QmaxParams(), UPPER))
    q = chromagram.query(wave)
    np.testing.assert_allclose(q.chroma, full, atol=0.5 / 255)
    np.testing.assert_allclose(q.upper, upper, atol=0.5 / 255)
