"""Automatic scores for rendered previews: speaker similarity, duration sanity, silence and
clipping, optional ASR; and the preview rendering + checkpoint recommendation built on them."""

from fish_speech_core.evaluate.checks import AudioChecks, audio_checks, duration_ratio, expected_seconds
from fish_speech_core.evaluate.speaker import ResemblyzerEmbedder, SpeakerEmbedder, speaker_similarity

__all__ = [
    "AudioChecks",
    "ResemblyzerEmbedder",
    "SpeakerEmbedder",
    "audio_checks",
    "duration_ratio",
    "expected_seconds",
    "speaker_similarity",
]
