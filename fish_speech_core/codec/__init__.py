"""The Firefly VQ-GAN codec of Fish Speech 1.4: audio -> semantic codes (and back).

Public API: :class:`FireflyConfig` and its presets, :class:`FireflyCodec`, and the checkpoint
functions :func:`load_codec`, :func:`init_codec`, :func:`save_codec`, :func:`codec_hash`.
The extraction engine lives in :mod:`fish_speech_core.codec.extract`.
"""

from fish_speech_core.lazy import exports

# Resolved on first use (fish_speech_core.lazy): reading a config must not import torch.
_WHERE = {
    "CodecCheckpointError": "checkpoint", "CodecCheckpointWarning": "checkpoint", "codec_hash": "checkpoint",
    "init_codec": "checkpoint", "load_codec": "checkpoint", "save_codec": "checkpoint",
    "PRESETS": "config", "FireflyConfig": "config", "resolve_config": "config", "FireflyCodec": "model",
}
__getattr__ = exports(__name__, _WHERE)

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
