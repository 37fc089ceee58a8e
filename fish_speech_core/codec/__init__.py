"""The Firefly VQ-GAN codec of Fish Speech 1.4: audio -> semantic codes (and back).

Public API: :class:`FireflyConfig` and its presets, :class:`FireflyCodec`, and the checkpoint
functions :func:`load_codec`, :func:`init_codec`, :func:`save_codec`, :func:`codec_hash`.
The extraction engine lives in :mod:`fish_speech_core.codec.extract`.
"""

from fish_speech_core.codec.checkpoint import (
    CodecCheckpointError,
    CodecCheckpointWarning,
    codec_hash,
    init_codec,
    load_codec,
    save_codec,
)
from fish_speech_core.codec.config import PRESETS, FireflyConfig, resolve_config
from fish_speech_core.codec.model import FireflyCodec

__all__ = [
    "PRESETS",
    "CodecCheckpointError",
    "CodecCheckpointWarning",
    "FireflyCodec",
    "FireflyConfig",
    "codec_hash",
    "init_codec",
    "load_codec",
    "resolve_config",
    "save_codec",
]
