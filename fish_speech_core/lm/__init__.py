"""The Fish Speech 1.4 dual-AR text2semantic model: config, architecture, losses, checkpoint I/O."""

from fish_speech_core.lm.checkpoint import (
    CheckpointError,
    Pretrained,
    load_pretrained,
    load_state_dict,
    save_pretrained,
)
from fish_speech_core.lm.config import PRESETS, ConfigError, DualARConfig
from fish_speech_core.lm.loss import LMLosses, lm_losses
from fish_speech_core.lm.model import DualAROutput, DualARTransformer, init_weights

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "DualARConfig",
    "DualAROutput",
    "DualARTransformer",
    "LMLosses",
    "Pretrained",
    "init_weights",
    "lm_losses",
    "load_pretrained",
    "load_state_dict",
    "save_pretrained",
]
