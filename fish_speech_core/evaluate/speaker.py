"""Speaker similarity: cosine between voice embeddings of a rendered clip and real clips.

Any embedding model fits the :class:`SpeakerEmbedder` protocol. The default is Resemblyzer's
``VoiceEncoder`` (GE2E, 256-d), whose weights ship inside its PyPI package: no download.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Protocol

import numpy as np


class SpeakerEmbedder(Protocol):
    def embed(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """Mono float audio (samples,) -> an L2-normalised embedding (D,)."""
        ...


class ResemblyzerEmbedder:
    """Resemblyzer's VoiceEncoder (16 kHz, VAD-trimmed, loudness-normalised input)."""

    MIN_SAMPLES = 16000 // 4  # below a quarter second the encoder has nothing to go on

    def __init__(self, device: str = "cpu") -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # webrtcvad imports the deprecated pkg_resources
            from resemblyzer import VoiceEncoder, preprocess_wav
        self._preprocess = preprocess_wav
        self._encoder = VoiceEncoder(device, verbose=False)
        self._cpu = str(device).startswith("cpu")

    def embed(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        from fish_speech_core.threads import one_thread

        # A 1.4 M-parameter LSTM: one CPU thread embeds a 3 s clip in 0.3 s instead of 2.5-6.7 s
        # on 2 busy cores (same embedding).
        with one_thread(self._cpu):
            return self._embed(audio, sample_rate)

    def _embed(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        audio = np.asarray(audio, dtype=np.float32)
        wav = self._preprocess(audio, source_sr=sample_rate)
        if wav.size < self.MIN_SAMPLES:
            # VAD removed (almost) everything, e.g. noise from an untrained model: embed the
            # resampled clip untrimmed rather than fail.
            import torch

            from fish_speech_core.audio import resample

            wav = resample(torch.from_numpy(audio), sample_rate, 16000).numpy()
        if wav.size < self.MIN_SAMPLES:
            wav = np.pad(wav, (0, self.MIN_SAMPLES - wav.size))
        emb = self._encoder.embed_utterance(wav)
        return emb / max(float(np.linalg.norm(emb)), 1e-12)


def reference_embedding(embedder: SpeakerEmbedder, references: Sequence[tuple[np.ndarray, int]]) -> np.ndarray:
    """The unit-length mean embedding of a speaker's real clips (computed once, compared many times)."""
    if not references:
        raise ValueError("speaker similarity needs at least one reference clip")
    ref = np.mean([embedder.embed(a, sr) for a, sr in references], axis=0)
    return ref / max(float(np.linalg.norm(ref)), 1e-12)


def speaker_similarity(
    embedder: SpeakerEmbedder,
    audio: np.ndarray,
    sample_rate: int,
    references: Sequence[tuple[np.ndarray, int]] | np.ndarray,
) -> float:
    """Cosine similarity between ``audio`` and the mean embedding of the reference clips.

    ``references``: (audio, rate) pairs, or their :func:`reference_embedding`.
    """
    ref = references if isinstance(references, np.ndarray) else reference_embedding(embedder, references)
    return float(np.dot(embedder.embed(audio, sample_rate), ref))
