"""Audio reading and resampling, independent of torchaudio's I/O backends.

torchaudio >= 2.9 routes ``torchaudio.load`` through torchcodec; we read with soundfile
(libsndfile reads wav/flac/mp3/ogg) and only use ``torchaudio.functional`` for math.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import soundfile

# Lower-case suffixes fishtune treats as audio. libsndfile >= 1.1 reads mp3; ogg where built in.
AUDIO_EXTENSIONS: tuple[str, ...] = (".wav", ".flac", ".mp3", ".ogg")
# Audio a user may well drop in a speaker folder that fishtune does not read (the reference
# recipe lists the four above): reported as unsupported-audio-format, so their transcripts are
# not called orphans. Compared lower-case, like AUDIO_EXTENSIONS.
UNSUPPORTED_AUDIO_EXTENSIONS: tuple[str, ...] = (
    ".opus", ".m4a", ".aac", ".mp4", ".aif", ".aiff", ".aifc", ".wma", ".webm", ".amr", ".3gp", ".caf", ".alac", ".ape",
    ".wv", ".oga", ".mka", ".au", ".snd",
)


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    channels: int
    frames: int
    format: str  # soundfile's container name, e.g. "WAV", "FLAC", "MP3"
    subtype: str

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Read only the header. Raises soundfile.LibsndfileError (a RuntimeError) if unreadable."""
    info = soundfile.info(str(path))
    return AudioInfo(info.samplerate, info.channels, info.frames, info.format, info.subtype)


def read_audio(path: str | os.PathLike, dtype: str = "float32") -> tuple[np.ndarray, int]:
    """Decode a file to an array shaped (channels, frames) and its sample rate.

    16-bit PCM becomes ``int16 / 32768`` exactly as the reference reader does.
    """
    data, sample_rate = soundfile.read(str(path), dtype=dtype, always_2d=True)
    return np.ascontiguousarray(data.T), int(sample_rate)


def to_mono(audio: np.ndarray) -> np.ndarray:
    """(channels, frames) -> (frames,), averaging the channels like the reference extractor."""
    if audio.ndim == 1:
        return audio
    if audio.shape[0] == 1:
        return audio[0]
    return audio.mean(axis=0, dtype=audio.dtype)


def resample(audio, orig_sr: int, new_sr: int):
    """Resample a float tensor along its last axis with torchaudio's default sinc filter.

    Returns the input unchanged when the rates already match (as the reference does).
    """
    if orig_sr == new_sr:
        return audio
    import torchaudio.functional as AF  # imported here: torch is heavy and often not needed

    return AF.resample(audio, orig_sr, new_sr)
