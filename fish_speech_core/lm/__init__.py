"""The Fish Speech 1.4 dual-AR text2semantic model: config, architecture, losses, checkpoint I/O."""

from fish_speech_core.lazy import exports

# Resolved on first use (fish_speech_core.lazy): reading a config must not import torch.
_WHERE = {
    "CheckpointError": "checkpoint", "Pretrained": "checkpoint", "load_pretrained": "checkpoint",
    "load_state_dict": "checkpoint", "save_pretrained": "checkpoint",
    "PRESETS": "config", "ConfigError": "config", "DualARConfig": "config",
    "LMLosses": "loss", "lm_losses": "loss", "training_loss_sums": "loss",
    "DualAROutput": "model", "DualARTransformer": "model", "init_weights": "model",
}
__getattr__ = exports(__name__, _WHERE)

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
    "training_loss_sums",
]
