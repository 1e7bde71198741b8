"""The library as docs/api.md uses it: adding a track twice says what differs, and
`rank_tracks` verifies by default as the service does, where it has the chroma to."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import soundfile as sf

from refrain.index import AddResult, TrackExistsError, TrackRecord, open_index
from refrain.model import load_model
from refrain.model.align import Alignment
from refrain.model.sequence import Chromagram
from refrain.search.ranking import QuerySegments, SearchOptions, SegmentMatch, rank_tracks
from refrain.service.settings import Settings

from conftest import CKPT_A
from helpers import SR, synth_song

HOP = 5.0


@pytest.fixture(scope="module")
def model():
    return load_model(CKPT_A)


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    """song.flac, 45 s, and clip.wav, its seconds 20 to 40, as the docs' examples read them."""
    folder = tmp_path_factory.mktemp("library-audio")
    song = synth_song(45.0, seed=7)
    sf.write(folder / "song.flac", song, SR)
    sf.write(folder / "clip.wav", song[20 * SR : 40 * SR], SR)
    return folder


def test_adding_a_stored_track_again_says_what_differs(model, audio, tmp_path):
    vectors = model.embed(audio / "song.flac", hop=HOP)
    starts = np.arange(len(vectors)) * HOP
    with open_index(tmp_path / "catalog", model.identity.to_dict()) as index:
        index.add_track(TrackRecord("song-1", title="Song"), vectors, starts)
        with pytest.raises(TrackExistsError) as caught:
            index.add_track(TrackRecord("song-1", title="Song"), vectors, starts)
        message = str(caught.value)
        assert "None" not in message
        assert message == (
            "track 'song-1' is already stored (neither has a content_sha256, so whether the "
            "audio is the same is unknown; set TrackRecord.content_sha256 to make adding the "
            "same audio again a no-op); pass replace=True to replace it"
        )
        with pytest.raises(TrackExistsError, match=r"\(the stored one has no content_sha256"):
            index.add_track(TrackRecord("song-1", content_sha256="ab" * 32), vectors, starts)

        song, clip = (audio / "song.flac").read_bytes(), (audio / "clip.wav").read_bytes()
        digest, other = hashlib.sha256(song).hexdigest(), hashlib.sha256(clip).hexdigest()
        record = TrackRecord("song-2", content_sha256=digest)
        assert index.add_track(record, vectors, starts) == AddResult.ADDED
        assert index.add_track(record, vectors, starts) == AddResult.UNCHANGED
        with pytest.raises(TrackExistsError) as caught:
            index.add_track(TrackRecord("song-2", content_sha256=other), vectors, starts)
        assert str(caught.value) == (
            f"track 'song-2' is already stored with other audio (content_sha256 {digest[:12]}... "
            f"stored, {other[:12]}... given); pass replace=True to replace it"
        )
        with pytest.raises(TrackExistsError, match=r"\(the new one has no content_sha256"):
            index.add_track(TrackRecord("song-2"), vectors, starts)


def test_the_library_defaults_are_the_services():
    options, settings = SearchOptions(), Settings()
    assert options.verify == settings.verify_candidates > 0
    assert options.verify_weight == settings.verify_weight
    assert options.verify_expand == settings.verify_expand
    assert options.candidates >= options.verify


def test_rank_tracks_verifies_by_default_given_the_chroma(model, audio, tmp_path):
    chromagram = Chromagram(model.config)
    song = model.waveform(audio / "song.flac")
    vectors = model.embed(song, hop=HOP)
    record = TrackRecord("song-1", sequence=chromagram.reference(song))
    wave = model.waveform(audio / "clip.wav")
    clip = model.embed(wave, hop=HOP)
    plain = QuerySegments(
        clip,
        np.arange(len(clip)) * HOP,
        segment_s=model.config.shingling.len,
        duration_s=len(wave) / model.sample_rate,
    )
    chroma, fine, upper, *_ = chromagram.query(wave)
    with_chroma = QuerySegments(
        plain.vectors,
        plain.starts_s,
        plain.segment_s,
        plain.duration_s,
        chroma=chroma,
        fine=fine,
        upper=upper,
    )
    with open_index(tmp_path / "catalog", model.identity.to_dict()) as index:
        index.add_track(record, vectors, np.arange(len(vectors)) * HOP)
        (hit,) = rank_tracks(index, with_chroma, SearchOptions(top_k=5))
        assert hit.alignment is not None and hit.alignment > 0
        (match, *_) = hit.matches
        assert isinstance(match, Alignment)
        assert match.ref_start_s == pytest.approx(20.0, abs=1.0)
        assert match.ref_end_s == pytest.approx(40.0, abs=1.0)
        # without the query's chroma there is nothing to align: segment ranges, as before
        (hit,) = rank_tracks(index, plain, SearchOptions(top_k=5))
        assert hit.alignment is None and isinstance(hit.matches[0], SegmentMatch)
