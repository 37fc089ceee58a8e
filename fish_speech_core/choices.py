"""Named choices that several commands, the flow's config and the core share: one enum each.

Light on purpose (no torch, no Prefect): the CLI imports it to build ``--help`` and the flow's
config for its schema. The core keeps its own tables keyed by these values (codec presets,
extraction dtypes); a test holds the two to the same names.
"""

from __future__ import annotations

from enum import Enum


class Device(str, Enum):
    """Where a command runs its model."""

    auto = "auto"  # cuda when available, else cpu
    cpu = "cpu"
    cuda = "cuda"


class CodecPreset(str, Enum):
    """Firefly codec shapes (fish_speech_core.codec.config.PRESETS)."""

    tiny = "tiny"  # tests and offline demos
    fish_speech_1_4 = "fish-speech-1.4"  # firefly-gan-vq-fsq-8x1024-21hz-generator.pth


class CodecDtype(str, Enum):
    """Encoder precision of extraction (fish_speech_core.codec.extract.DTYPES)."""

    fp32 = "fp32"  # matches the reference codes
    bf16 = "bf16"  # encoder under autocast: faster on recent GPUs, a few codes may differ


class AudioFormat(str, Enum):
    """Output format of normalization: keep the input's, or convert."""

    keep = "keep"
    flac = "flac"
    wav = "wav"


class Sampling(str, Enum):
    """Where a training sample's consecutive sentences start (fish_speech_core.finetune.data.SAMPLING_MODES)."""

    cover = "cover"  # anywhere in the speaker, wrapping: every clip is trained on
    reference = "reference"  # Fish Speech 1.4: short speakers always from their first clip


class TrainStrategy(str, Enum):
    """How training spreads over processes (fish_speech_core.finetune.module.STRATEGIES)."""

    auto = "auto"  # DDP when devices x num_nodes > 1, else one process
    ddp = "ddp"  # DistributedDataParallel, even in one process


class Backend(str, Enum):
    """torch.distributed backend of DDP training (fish_speech_core.finetune.module.BACKENDS)."""

    gloo = "gloo"  # CPU (and GPU, slower)
    nccl = "nccl"  # GPUs


def values(choice: type[Enum]) -> tuple[str, ...]:
    """The choice's values in definition order, for the core's tuples of valid names."""
    return tuple(member.value for member in choice)
