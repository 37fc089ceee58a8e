"""Constructor arguments of the Firefly VQ-GAN as frozen dataclasses, with named presets.

``fish-speech-1.4`` is the unmodified ``firefly_gan_vq.yaml`` (the shape of
``firefly-gan-vq-fsq-8x1024-21hz-generator.pth``); ``tiny`` is a small codec for tests and
demos. :func:`FireflyConfig.from_file` reads a JSON of constructor arguments shaped like the
reference's Hydra config (``_target_`` keys allowed and checked, never evaluated).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class SpecConfig:
    sample_rate: int = 44100
    n_mels: int = 160
    n_fft: int = 2048
    hop_length: int = 512
    win_length: int = 2048
    center: bool = False
    f_min: float = 0.0
    f_max: float | None = None  # None means sample_rate / 2


@dataclass(frozen=True)
class EncoderConfig:
    input_channels: int = 160
    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (128, 256, 384, 512)
    drop_path_rate: float = 0.2  # training only; inactive in eval
    kernel_size: int = 7
    layer_scale_init_value: float = 1e-6


@dataclass(frozen=True)
class QuantizerConfig:
    input_dim: int = 512
    n_groups: int = 8
    n_codebooks: int = 1
    levels: tuple[int, ...] = (8, 5, 5, 5)
    downsample_factor: tuple[int, ...] = (2, 2)
    downsample_dims: tuple[int, ...] | None = None


@dataclass(frozen=True)
class HeadConfig:
    hop_length: int = 512
    upsample_rates: tuple[int, ...] = (8, 8, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 4, 4, 4)
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    num_mels: int = 512
    upsample_initial_channel: int = 512
    pre_conv_kernel_size: int = 13
    post_conv_kernel_size: int = 13


# JSON section name -> (dataclass, reference class name its ``_target_`` must end with)
_SECTIONS = {
    "spec_transform": (SpecConfig, "LogMelSpectrogram"),
    "backbone": (EncoderConfig, "ConvNeXtEncoder"),
    "quantizer": (QuantizerConfig, "DownsampleFiniteScalarQuantize"),
    "head": (HeadConfig, "HiFiGANGenerator"),
}
_ROOT_TARGET = "FireflyArchitecture"


def _tuplify(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


@dataclass(frozen=True)
class FireflyConfig:
    spec_transform: SpecConfig = field(default_factory=SpecConfig)
    backbone: EncoderConfig = field(default_factory=EncoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    head: HeadConfig = field(default_factory=HeadConfig)

    @property
    def num_codebooks(self) -> int:
        """Rows of a code array: FSQ groups x residual quantizers (8 for Fish Speech 1.4)."""
        return self.quantizer.n_groups * self.quantizer.n_codebooks

    @property
    def samples_per_code(self) -> int:
        """Audio samples per code frame at ``sample_rate`` (512 x 4 = 2048 for 1.4)."""
        factor = 1
        for f in self.quantizer.downsample_factor:
            factor *= f
        return self.spec_transform.hop_length * factor

    def num_code_frames(self, num_samples: int) -> int:
        """Code frames for a clip of ``num_samples`` at ``sample_rate``: ``(n // hop) // 4``."""
        factor = self.samples_per_code // self.spec_transform.hop_length
        return (num_samples // self.spec_transform.hop_length) // factor

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain JSON-able dict (no ``_target_`` keys) that :meth:`from_dict` reads back."""
        return {name: asdict(getattr(self, name)) for name in _SECTIONS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FireflyConfig:
        """Build from constructor arguments, as in ``small-config.json``.

        Raises:
            ValueError: naming every unknown/missing section, unknown argument or wrong target.
        """
        problems: list[str] = []
        target = data.get("_target_")
        if target is not None and not str(target).endswith(_ROOT_TARGET):
            problems.append(f"_target_ {target!r} is not a {_ROOT_TARGET}")
        unknown = sorted(set(data) - set(_SECTIONS) - {"_target_"})
        if unknown:
            problems.append(f"unknown sections {unknown} (expected {sorted(_SECTIONS)})")
        sections: dict[str, Any] = {}
        for name, (klass, class_name) in _SECTIONS.items():
            raw = data.get(name)
            if raw is None:
                problems.append(f"missing section {name!r}")
                continue
            raw = dict(raw)
            sub_target = raw.pop("_target_", None)
            if sub_target is not None and not str(sub_target).endswith(class_name):
                problems.append(f"{name}._target_ {sub_target!r} is not a {class_name}")
            allowed = {f.name for f in fields(klass)}
            extra = sorted(set(raw) - allowed)
            if extra:
                problems.append(f"{name}: unknown arguments {extra}")
            sections[name] = klass(**{k: _tuplify(v) for k, v in raw.items() if k in allowed})
        if problems:
            raise ValueError("invalid codec config: " + "; ".join(problems))
        return cls(**sections)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> FireflyConfig:
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    @classmethod
    def from_name(cls, name: str) -> FireflyConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown codec preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]


PRESETS: dict[str, FireflyConfig] = {
    "fish-speech-1.4": FireflyConfig(),
    # Same sections as the fixture's small-config.json: fast enough for unit tests.
    "tiny": FireflyConfig(
        backbone=EncoderConfig(depths=(1, 1, 2, 1), dims=(32, 48, 64, 128)),
        quantizer=QuantizerConfig(input_dim=128),
        head=HeadConfig(num_mels=128, upsample_initial_channel=64),
    ),
}


def resolve_config(preset_or_config: str | os.PathLike | FireflyConfig) -> FireflyConfig:
    """A preset name, a path to a JSON of constructor arguments, or a config itself."""
    if isinstance(preset_or_config, FireflyConfig):
        return preset_or_config
    text = str(preset_or_config)
    if text in PRESETS:
        return PRESETS[text]
    if text.endswith(".json") or os.path.exists(text):
        return FireflyConfig.from_file(text)
    raise ValueError(
        f"{text!r} is neither a codec preset ({', '.join(sorted(PRESETS))}) nor a JSON config file"
    )
