"""Sanity checks of a rendered clip: duration vs the text, silence, clipping."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fish_speech_core.formats.text import clean_text

# Typical read speech: ~150 words/min x ~5.5 characters per word (with the space) ~ 14 chars/s.
CHARS_PER_SECOND = 14.0
DURATION_RATIO_OK = (0.5, 2.0)  # outside: the model babbled on or cut the text short
SILENCE_DBFS = -40.0
FRAME_SECONDS = 0.02
CLIP_LEVEL = 0.999


def expected_seconds(text: str, chars_per_second: float = CHARS_PER_SECOND) -> float:
    """Rough spoken length of ``text`` (cleaned as for the model)."""
    return len(clean_text(text)) / chars_per_second


def duration_ratio(seconds: float, text: str, chars_per_second: float = CHARS_PER_SECOND) -> float:
    """Actual / expected duration; ~1 for natural speech."""
    expected = expected_seconds(text, chars_per_second)
    return seconds / expected if expected > 0 else float("inf")


@dataclass(frozen=True)
class AudioChecks:
    seconds: float
    duration_ratio: float
    silence_fraction: float  # share of 20 ms frames below -40 dBFS
    longest_silence_s: float
    clipped_fraction: float  # share of samples at |x| >= 0.999
    ok: bool  # duration within DURATION_RATIO_OK, < 50% silence, < 0.1% clipped
    problems: tuple[str, ...]

    def as_dict(self) -> dict:
        return asdict(self)


def audio_checks(audio: np.ndarray, sample_rate: int, text: str) -> AudioChecks:
    """Duration, silence and clipping checks of mono ``audio`` (samples,) that should say ``text``."""
    audio = np.asarray(audio, dtype=np.float64).reshape(-1)
    seconds = audio.size / sample_rate
    frame = max(1, int(sample_rate * FRAME_SECONDS))
    n = audio.size // frame
    if n:
        rms = np.sqrt(np.mean(audio[: n * frame].reshape(n, frame) ** 2, axis=1))
        silent = 20 * np.log10(np.maximum(rms, 1e-10)) < SILENCE_DBFS
        silence = float(silent.mean())
        longest = run = 0
        for s in silent:
            run = run + 1 if s else 0
            longest = max(longest, run)
        longest_s = longest * frame / sample_rate
    else:
        silence, longest_s = 1.0, seconds
    clipped = float(np.mean(np.abs(audio) >= CLIP_LEVEL)) if audio.size else 0.0
    ratio = duration_ratio(seconds, text)
    problems = []
    lo, hi = DURATION_RATIO_OK
    if not lo <= ratio <= hi:
        problems.append(f"duration {seconds:.2f} s is {ratio:.2f}x the expected length")
    if silence >= 0.5:
        problems.append(f"{silence:.0%} silent")
    if clipped >= 1e-3:
        problems.append(f"{clipped:.2%} of samples clipped")
    return AudioChecks(seconds, ratio, silence, longest_s, clipped, not problems, tuple(problems))
