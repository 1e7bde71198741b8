"""Whether a file holds all the audio its container declares: one rule for every format.

A reference must be whole, and an upload cut off in transit still decodes: the decoders keep
what they read and say nothing. Each container declares, in its own terms, how much audio it
holds, and a file that ends short of that is truncated:

- FLAC (STREAMINFO), MP3 (a Xing/Info or VBRI frame count) and the formats PyAV reads
  (M4A/AAC) declare their length in samples or seconds, which the decoder reports;
- WAV (RIFF, RIFX, RF64) and AIFF/AIFC declare the size of their data chunk, which libsndfile
  and FFmpeg quietly clamp to the bytes present: the sizes are read here;
- Ogg (Vorbis, Opus, FLAC in Ogg) declares no length up front, but each logical stream ends
  with a page flagged end-of-stream: a stream without one is cut off.

Codecs pad and containers round, so a stream may end up to 2 % (and 0.5 s) short of its
declared length; beyond that it is truncated. A length the container does not know (a
streaming WAV header, FLAC of unknown length, MP3 without a frame count) is never held
against it.
"""

from __future__ import annotations

import io
from typing import BinaryIO, Literal

# how far short of its declared length a stream may end: codec padding and rounding
_SLACK_S = 0.5
_SLACK_FRACTION = 0.02
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # what streaming writers leave in a RIFF data chunk's size
_OGG_BOS, _OGG_EOS = 0x02, 0x04
_OGG_HEADER = 27


def missing_audio(file: BinaryIO, decoded_s: float, header_s: float | None) -> str | None:
    """Why the file ends short of the audio its container declares, in a sentence; None when
    it holds it all (or its container does not say). `decoded_s` is what decoded,
    `header_s` the length the decoder read from the header (None: not stated)."""
    declared_s = header_s
    chunk = _data_chunk(file)
    if chunk is not None:
        declared, present = chunk
        if 0 < present < declared:  # the decoders counted the bytes present
            declared_s = max(declared_s or 0.0, decoded_s * declared / present)
    if declared_s is not None and _short(decoded_s, declared_s):
        return (
            f"the audio ends after {decoded_s:.2f} s of the {declared_s:.2f} s its header "
            "declares (a truncated file?)"
        )
    if _ogg_unended(file):
        return (
            f"the audio ends after {decoded_s:.2f} s without the end-of-stream page its Ogg "
            "container closes with (a truncated file?)"
        )
    return None


def _short(decoded_s: float, declared_s: float) -> bool:
    return decoded_s < declared_s - max(_SLACK_S, _SLACK_FRACTION * declared_s)


def _size(file: BinaryIO) -> int:
    return file.seek(0, io.SEEK_END)


def _data_chunk(file: BinaryIO) -> tuple[int, int] | None:
    """(bytes the audio data chunk declares, bytes of it present) of a WAV (RIFF, RIFX, RF64)
    or AIFF/AIFC file; None for other formats, a streaming header or no data chunk."""
    size = _size(file)
    file.seek(0)
    head = file.read(12)
    kind, form = head[:4], head[8:12]
    order: Literal["little", "big"]
    if kind in (b"RIFF", b"RF64", b"BW64") and form == b"WAVE":
        order, wanted = "little", b"data"
    elif kind == b"RIFX" and form == b"WAVE":
        order, wanted = "big", b"data"
    elif kind == b"FORM" and form in (b"AIFF", b"AIFC"):
        order, wanted = "big", b"SSND"
    else:
        return None
    pos, ds64 = 12, None
    while pos + 8 <= size:
        file.seek(pos)
        header = file.read(8)
        name, n = header[:4], int.from_bytes(header[4:8], order)
        if name == b"ds64":  # RF64: the 64-bit sizes, the data chunk's second
            body = file.read(16)
            ds64 = int.from_bytes(body[8:16], "little") if len(body) == 16 else None
        if name == wanted:
            if n == 0xFFFFFFFF and ds64 is not None:
                n = ds64
            if n in _UNKNOWN_SIZES:
                return None
            return n, max(0, min(n, size - pos - 8))
        pos += 8 + n + (n & 1)  # chunks are padded to an even size
    return None


def _ogg_unended(file: BinaryIO) -> bool:
    """True when the file is Ogg and a logical stream it begins has no end-of-stream page (or
    its last page is cut short): pages are walked by their headers, bodies are skipped."""
    size = _size(file)
    file.seek(0)
    if file.read(4) != b"OggS":
        return False
    open_streams: set[bytes] = set()
    pos = 0
    while pos < size:
        file.seek(pos)
        header = file.read(_OGG_HEADER)
        if len(header) < _OGG_HEADER:
            return True  # cut inside a page header
        if header[:4] != b"OggS":
            break  # not a page: whatever follows the last stream is not the streams' concern
        flags, serial = header[5], header[14:18]
        lacing = file.read(header[26])
        end = pos + _OGG_HEADER + header[26] + sum(lacing)
        if len(lacing) < header[26] or end > size:
            return True  # the last page is cut short
        if flags & _OGG_BOS:
            open_streams.add(serial)
        if flags & _OGG_EOS:
            open_streams.discard(serial)
        pos = end
    return bool(open_streams)
