"""LoRA training presets: the adapter's shape and the batch / length / validation cadence.

``small`` is the Fish Speech 1.4 recipe (r 8, alpha 16, batch 8, validate every 100 steps);
``tiny`` makes CPU demos and tests finish in seconds; ``large`` is a wider adapter. A field left
None keeps :class:`~fish_speech_core.finetune.module.TrainConfig`'s default. No heavy imports:
the flow's parameter models and the CLI read this module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

from fish_speech_core.defaults import LORA_ALPHA, LORA_R


@dataclass(frozen=True)
class TrainPreset:
    lora_r: int
    lora_alpha: float
    batch_size: int
    max_length: int
    val_check_interval: int
    lr: float
    warmup_steps: int | None = None
    val_fraction: float | None = None
    val_batch_size: int | None = None


PRESETS: MappingProxyType[str, TrainPreset] = MappingProxyType({
    # CPU demos and tests: a rank-4 adapter, short samples, validation every 10 steps.
    "tiny": TrainPreset(lora_r=4, lora_alpha=8.0, batch_size=2, max_length=256, val_check_interval=10, lr=1e-3,
                        warmup_steps=2, val_fraction=0.2, val_batch_size=4),
    # The recipe's adapter (r 8, alpha 16).
    "small": TrainPreset(lora_r=LORA_R, lora_alpha=LORA_ALPHA, batch_size=8, max_length=4096,
                         val_check_interval=100, lr=1e-4),
    "large": TrainPreset(lora_r=32, lora_alpha=64.0, batch_size=8, max_length=4096, val_check_interval=100, lr=1e-4),
})


def preset_settings(name: str) -> dict[str, Any]:
    """The :class:`TrainConfig` fields preset ``name`` sets (fields it leaves None are omitted).

    Raises:
        ValueError: an unknown preset, naming the known ones.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown training preset {name!r}; choose one of {list(PRESETS)}")
    return {key: value for key, value in asdict(PRESETS[name]).items() if value is not None}
