"""LoRA training presets: the adapter's shape and the batch / length / validation cadence.

``small`` is the Fish Speech 1.4 recipe (r 8, alpha 16, batch 8, validate every 100 steps);
``tiny`` makes CPU demos and tests finish in seconds; ``large`` is a wider adapter.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(lora_r=4, lora_alpha=8.0, batch_size=2, max_length=256, val_check_interval=10, lr=1e-3,
                 warmup_steps=2, val_fraction=0.2, val_batch_size=4),
    "small": dict(lora_r=8, lora_alpha=16.0, batch_size=8, max_length=4096, val_check_interval=100, lr=1e-4),
    "large": dict(lora_r=32, lora_alpha=64.0, batch_size=8, max_length=4096, val_check_interval=100, lr=1e-4),
}


def preset_settings(preset: str) -> dict[str, Any]:
    """A copy of the preset's TrainConfig fields (KeyError names an unknown preset)."""
    return dict(PRESETS[preset])
