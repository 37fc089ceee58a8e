"""The dual-AR model config: the fields of a Fish Speech 1.4 ``config.json``, plus presets.

``config.json`` is the dataclass dumped with sorted keys and a 4-space indent, derived fields
included (fixtures README section 2), so :meth:`DualARConfig.to_dict` writes every field and
:meth:`DualARConfig.from_dict` fills the derived ones when a file leaves them out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fish_speech_core.formats.prompt import TOKENS_PER_SENTENCE_ESTIMATE

MODEL_TYPE = "dual_ar"
# A context shorter than the sampler's smallest sample (one sentence estimate) cannot train or
# generate anything; such a config.json is damaged, not a tiny model.
MIN_MAX_SEQ_LEN = TOKENS_PER_SENTENCE_ESTIMATE
# Fields that must be integers >= 1 (None: derived); n_local_heads also allows -1 (= n_head).
_POSITIVE_INTS = ("vocab_size", "n_layer", "n_head", "dim", "intermediate_size", "n_local_heads",
                  "head_dim", "max_seq_len", "codebook_size", "num_codebooks", "n_fast_layer",
                  "fast_dim", "fast_n_head", "fast_n_local_heads", "fast_head_dim",
                  "fast_intermediate_size")
_DERIVED = ("intermediate_size", "head_dim", "fast_dim", "fast_n_head", "fast_n_local_heads", "fast_head_dim",
            "fast_intermediate_size")
_POSITIVE_FLOATS = ("rope_base", "norm_eps")
_BOOLS = ("tie_word_embeddings", "attention_qkv_bias", "use_gradient_checkpointing", "is_reward_model",
          "share_codebook_embeddings", "fast_attention_qkv_bias")


class ConfigError(ValueError):
    """A ``config.json`` that does not describe a dual-AR model fishtune can build."""


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of ``k`` that is >= ``n``."""
    return n if n % k == 0 else n + k - (n % k)


@dataclass(frozen=True)
class DualARConfig:
    """Shape of the slow (text/time) transformer and the fast (codebook) transformer.

    ``None`` marks a derived field; the constructor resolves it the way the reference does:
    ``n_local_heads`` = ``n_head``, ``head_dim`` = ``dim // n_head``, ``intermediate_size`` =
    ``find_multiple(int(2 * 4 * dim / 3), 256)``, and every ``fast_*`` field from its slow twin.
    """

    model_type: str = MODEL_TYPE
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    dim: int = 4096
    intermediate_size: int | None = None
    n_local_heads: int = -1
    head_dim: int = 64
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    dropout: float = 0.0
    tie_word_embeddings: bool = True
    attention_qkv_bias: bool = False
    codebook_size: int = 160
    num_codebooks: int = 4
    use_gradient_checkpointing: bool = True
    initializer_range: float = 0.02
    is_reward_model: bool = False
    share_codebook_embeddings: bool = True
    n_fast_layer: int = 4
    fast_dim: int | None = None
    fast_n_head: int | None = None
    fast_n_local_heads: int | None = None
    fast_head_dim: int | None = None
    fast_intermediate_size: int | None = None
    fast_attention_qkv_bias: bool | None = None

    def _type_problems(self) -> list[str]:
        """Wrong types and ranges, checked before anything is derived from them."""
        problems = []
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if (value is None and name in _DERIVED) or (name == "n_local_heads" and value == -1):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        for name in _POSITIVE_FLOATS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                problems.append(f"{name} must be a number > 0, got {value!r}")
        for name, low, high in (("dropout", 0.0, 1.0), ("initializer_range", 0.0, float("inf"))):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
                problems.append(f"{name} must be a number in [{low:g}, {high:g}), got {value!r}")
        for name in _BOOLS:
            value = getattr(self, name)
            if not isinstance(value, bool) and not (value is None and name.startswith("fast_")):
                problems.append(f"{name} must be true or false, got {value!r}")
        if not problems and self.max_seq_len < MIN_MAX_SEQ_LEN:
            problems.append(f"max_seq_len {self.max_seq_len} is too small: a sample needs at least "
                            f"{MIN_MAX_SEQ_LEN} positions")
        return problems

    def __post_init__(self) -> None:
        if not isinstance(self.model_type, str) or self.model_type != MODEL_TYPE:
            raise ConfigError(
                f"model_type is {self.model_type!r}, but fishtune only supports {MODEL_TYPE!r} "
                "(the Fish Speech 1.4 text2semantic model); check that this is a fish-speech-1.4 "
                "checkpoint folder"
            )
        problems = self._type_problems()
        if problems:
            raise ConfigError("invalid dual-AR config: " + "; ".join(problems))
        # Derived fields, in the reference's order (head_dim always follows dim / n_head).
        derived = {"head_dim": self.dim // self.n_head}
        if self.n_local_heads == -1:
            derived["n_local_heads"] = self.n_head
        if self.intermediate_size is None:
            derived["intermediate_size"] = find_multiple(int(2 * (4 * self.dim) / 3), 256)
        for name, value in derived.items():
            object.__setattr__(self, name, value)  # frozen: resolve once, here
        fast_defaults = {
            "fast_dim": self.dim,
            "fast_n_head": self.n_head,
            "fast_n_local_heads": self.n_local_heads,
            "fast_head_dim": self.head_dim,
            "fast_intermediate_size": self.intermediate_size,
            "fast_attention_qkv_bias": self.attention_qkv_bias,
        }
        for name, value in fast_defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        problems = []
        if self.dim % self.n_head:
            problems.append(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.n_head % self.n_local_heads:
            problems.append(f"n_head {self.n_head} is not a multiple of n_local_heads {self.n_local_heads}")
        if self.fast_n_head % self.fast_n_local_heads:
            problems.append(
                f"fast_n_head {self.fast_n_head} is not a multiple of "
                f"fast_n_local_heads {self.fast_n_local_heads}"
            )
        if self.is_reward_model:
            problems.append("is_reward_model=true is not supported")
        if not self.share_codebook_embeddings:
            problems.append("share_codebook_embeddings=false is not supported")
        if problems:
            raise ConfigError("invalid dual-AR config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "DualARConfig":
        """Build from a parsed ``config.json``; unknown fields are dropped with a warning."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown config fields {unknown}", stacklevel=2)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "DualARConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object, not {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_name(cls, name: str) -> "DualARConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The ``config.json`` text: sorted keys, 4-space indent, like the reference writes."""
        return json.dumps(self.to_dict(), indent=4, sort_keys=True)


PRESETS: dict[str, DualARConfig] = {
    # Same shape as fixtures/reference/tiny-llama: the parity and unit-test size.
    "tiny": DualARConfig(
        vocab_size=904, dim=64, n_layer=2, n_head=4, n_local_heads=2, n_fast_layer=1,
        codebook_size=1024, num_codebooks=8, max_seq_len=512, rope_base=1e6, norm_eps=1e-6,
        tie_word_embeddings=False, use_gradient_checkpointing=False,
    ),
    # Benchmark size between tiny and real.
    "mid": DualARConfig(
        vocab_size=32000, dim=512, n_layer=8, n_head=8, n_local_heads=2, n_fast_layer=4,
        codebook_size=1024, num_codebooks=8, max_seq_len=2048, rope_base=1e6, norm_eps=1e-6,
        tie_word_embeddings=False, use_gradient_checkpointing=False,
    ),
    # The released fish-speech-1.4 checkpoint (fixtures llama-real-shape.json).
    "fish-speech-1.4": DualARConfig(
        vocab_size=32000, dim=1024, n_layer=24, n_head=16, n_local_heads=2, n_fast_layer=4,
        codebook_size=1024, num_codebooks=8, intermediate_size=4096, max_seq_len=4096,
        rope_base=1e6, norm_eps=1e-6, tie_word_embeddings=False, attention_qkv_bias=False,
    ),
}
