"""Training presets and the recipe's run defaults: the one definition every layer reads.

A preset fixes the LoRA shape and the batch / length / validation cadence of a run
(``FinetuneConfig.preset``); a field left None keeps :class:`~fish_speech_core.finetune.module.TrainConfig`'s
default. No heavy imports: the flow's parameter model and the CLI read this module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

# The Fish Speech 1.4 finetune recipe (TrainConfig, LoraSettings and the CLI use these).
DEFAULT_SEED = 42
DEFAULT_MAX_STEPS = 1000
DEFAULT_LORA_R = 8
DEFAULT_LORA_ALPHA = 16.0
DEFAULT_LORA_DROPOUT = 0.01


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
    "small": TrainPreset(lora_r=DEFAULT_LORA_R, lora_alpha=DEFAULT_LORA_ALPHA, batch_size=8, max_length=4096,
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
