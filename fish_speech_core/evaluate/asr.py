"""Optional intelligibility: any ASR engine behind :class:`Transcriber`, scored by word error rate."""

from __future__ import annotations

import re
from typing import Protocol

import numpy as np


class Transcriber(Protocol):
    def transcribe(self, audio: np.ndarray, sample_rate: int) -> str:
        """Mono float audio -> text."""
        ...


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words (Levenshtein over words)."""
    ref, hyp = _words(reference), _words(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / len(ref)


# -------------------------------------------------------------- engines

SPHINX_RATE = 16_000  # the bundled en-us acoustic model is trained on 16 kHz speech


class PocketSphinx:
    """CMU PocketSphinx with the US-English model that ships inside its wheel (offline, no download).

    A weak recogniser (English only, far from Whisper) but enough to tell intelligible speech
    from babble: a rough, comparable-across-checkpoints score, never an absolute one.
    """

    def __init__(self) -> None:
        try:
            from pocketsphinx import Decoder
        except ImportError as error:
            raise ImportError("the 'pocketsphinx' ASR engine needs: pip install 'fishtune[asr]'") from error
        self._decoder = Decoder(samprate=SPHINX_RATE, logfn="/dev/null")

    def transcribe(self, audio: np.ndarray, sample_rate: int) -> str:
        import torch
        import torchaudio

        mono = np.asarray(audio, dtype=np.float32).reshape(-1)
        if sample_rate != SPHINX_RATE:
            mono = torchaudio.functional.resample(torch.from_numpy(mono), sample_rate, SPHINX_RATE).numpy()
        pcm = (np.clip(mono, -1.0, 1.0) * 32767).astype(np.int16).tobytes()
        self._decoder.start_utt()
        self._decoder.process_raw(pcm, full_utt=True)
        self._decoder.end_utt()
        hypothesis = self._decoder.hyp()
        return hypothesis.hypstr if hypothesis is not None else ""


ENGINES = {"pocketsphinx": PocketSphinx}
# What an ASR engine option may hold: a built-in name, or package.module:factory. The one
# definition: load_transcriber checks it here, the flow parameter model validates with it.
SPEC_PATTERN = rf"^({'|'.join(re.escape(name) for name in ENGINES)}|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$"


class AsrConfigError(ValueError):
    """The configured ASR engine cannot be loaded."""


def load_transcriber(spec: str) -> Transcriber:
    """A built-in engine by name, or ``package.module:factory`` (called with no arguments)."""
    if spec in ENGINES:
        return ENGINES[spec]()
    if not re.fullmatch(SPEC_PATTERN, spec):
        raise AsrConfigError(f"ASR engine {spec!r}: use one of {sorted(ENGINES)} or 'package.module:factory'")
    import importlib

    module_name, _, attribute = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise AsrConfigError(f"ASR engine {spec!r} cannot be imported ({error}); is its package installed?") from error
    engine = factory()
    if not callable(getattr(engine, "transcribe", None)):
        raise AsrConfigError(f"ASR engine {spec!r} returned {type(engine).__name__}, which has no transcribe(audio, sample_rate)")
    return engine
