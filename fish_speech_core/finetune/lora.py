"""LoRA for the dual-AR model as plain functions around peft: add, trainable params, adapter
state dict, load, merge.

Adapters are stored under the reference's names (fixtures README section 5):
``<module>.lora_A`` (r, in_features | num_embeddings) and ``<module>.lora_B``
(out_features | embedding_dim, r), which are exactly the shapes of peft's
``lora_A/B.default.weight`` (Linear) and ``lora_embedding_A/B.default`` (Embedding), so the map is
a rename, no transpose. Merging is explicit (:func:`merge_lora`); ``.eval()`` never merges.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from fish_speech_core.defaults import LORA_ALPHA, LORA_DROPOUT, LORA_PRESET, LORA_R
from fish_speech_core.finetune.dropout import ADAPTER, fold_lora_dropout
from fish_speech_core.formats.prompt import PROMPT_FORMAT_VERSION
from fish_speech_core.lm.checkpoint import state_dict_problems
from fish_speech_core.weights import read_weights

# Every module the reference wraps: both embeddings, the codebook embedding, every slow- and
# fast-layer projection and both output heads. Nothing else is trained.
TARGET_NAMES = (
    "embeddings", "codebook_embeddings", "fast_embeddings", "output", "fast_output",
    "wqkv", "wo", "w1", "w2", "w3",
)
# peft full-matches a string target_modules against each module's qualified name.
TARGET_REGEX = (
    r"^(embeddings|codebook_embeddings|fast_embeddings|output|fast_output"
    r"|(layers|fast_layers)\.\d+\.(attention\.(wqkv|wo)|feed_forward\.(w1|w2|w3)))$"
)
# peft parameter name fragments <-> the reference's suffixes.
_PEFT_SUFFIX = {
    "lora_A": (f"lora_A.{ADAPTER}.weight", f"lora_embedding_A.{ADAPTER}"),
    "lora_B": (f"lora_B.{ADAPTER}.weight", f"lora_embedding_B.{ADAPTER}"),
}


class LoraError(ValueError):
    """An adapter that does not fit the model or its metadata; the message says what differs."""


@dataclass(frozen=True)
class LoraSettings:
    """Rank, alpha and dropout of the adapters; scaling = alpha / r."""

    r: int = LORA_R
    alpha: float = LORA_ALPHA
    dropout: float = LORA_DROPOUT

    def __post_init__(self) -> None:
        problems = []
        if self.r < 1:
            problems.append(f"r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            problems.append(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if problems:
            raise LoraError("; ".join(problems))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @classmethod
    def from_name(cls, name: str) -> "LoraSettings":
        if name not in LORA_PRESETS:
            raise LoraError(f"unknown LoRA preset {name!r}; choose one of {sorted(LORA_PRESETS)}")
        return LORA_PRESETS[name]


LORA_PRESETS = {LORA_PRESET: LoraSettings()}  # the recipe's adapter (fish_speech_core.defaults)
DEFAULT_PRESET = LORA_PRESET


@dataclass(frozen=True)
class LoraMetadata:
    """What an adapter checkpoint says about itself, so merge needs nothing re-typed."""

    r: int
    alpha: float
    dropout: float
    targets: tuple[str, ...] = TARGET_NAMES
    base_sha256: str | None = None  # sha256 of the base model.pth; None = unknown (reference ckpt)
    prompt_format: str = PROMPT_FORMAT_VERSION

    @property
    def settings(self) -> LoraSettings:
        return LoraSettings(self.r, self.alpha, self.dropout)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "LoraMetadata":
        """Raises LoraError naming every missing, unknown or mistyped field."""
        if not isinstance(data, dict):
            raise LoraError(f"metadata must be a JSON object, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        problems = [f"unknown fields {sorted(set(data) - known)}"] if set(data) - known else []
        problems += [f"missing field {name!r}" for name in ("r", "alpha", "dropout") if name not in data]
        if problems:
            raise LoraError("; ".join(problems))
        targets = data.get("targets", TARGET_NAMES)
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
            raise LoraError(f"targets must be a list of module names, got {targets!r}")
        for name in ("base_sha256", "prompt_format"):
            if data.get(name) is not None and not isinstance(data[name], str):
                raise LoraError(f"{name} must be a string, got {data[name]!r}")
        r, alpha, dropout = data["r"], data["alpha"], data["dropout"]
        if isinstance(r, bool) or not isinstance(r, int):
            raise LoraError(f"r must be an integer, got {r!r}")
        for name, value in (("alpha", alpha), ("dropout", dropout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise LoraError(f"{name} must be a finite number, got {value!r}")
        LoraSettings(r, alpha, dropout)  # the ranges: r >= 1, alpha > 0, dropout in [0, 1)
        return cls(**{**data, "targets": tuple(targets)})

    def check(self, settings: LoraSettings | None = None, base_sha256: str | None = None) -> None:
        """Raise :class:`LoraError` naming every field that differs from what the caller has."""
        problems = []
        if settings is not None:
            for name in ("r", "alpha", "dropout"):
                mine, theirs = getattr(self, name), getattr(settings, name)
                # dropout does not change merged weights; a mismatch there is still reported
                if float(mine) != float(theirs):
                    problems.append(f"{name}: adapter has {mine}, requested {theirs}")
        if tuple(self.targets) != TARGET_NAMES:
            problems.append(f"targets: adapter has {list(self.targets)}, expected {list(TARGET_NAMES)}")
        if self.prompt_format != PROMPT_FORMAT_VERSION:
            problems.append(f"prompt format: adapter has {self.prompt_format!r}, expected {PROMPT_FORMAT_VERSION!r}")
        if base_sha256 and self.base_sha256 and base_sha256 != self.base_sha256:
            problems.append(
                f"base checkpoint: adapter was trained on model.pth sha256 {self.base_sha256[:12]}…, "
                f"this base is {base_sha256[:12]}…"
            )
        if problems:
            raise LoraError("the LoRA adapter does not match: " + "; ".join(problems))


# --- lifecycle -------------------------------------------------------------------------------


def add_lora(model: nn.Module, settings: LoraSettings | str) -> nn.Module:
    """Wrap the target modules with peft LoRA layers (B = 0, so the output is unchanged) and
    freeze everything but the adapters. Returns the same module, modified in place.

    Args:
        settings: a :class:`LoraSettings` or a preset name of :data:`LORA_PRESETS`.
    """
    from peft import LoraConfig, inject_adapter_in_model

    from fish_speech_core.finetune.lora_linear import fuse_lora_linears  # imports peft

    if isinstance(settings, str):
        settings = LoraSettings.from_name(settings)
    if not isinstance(settings, LoraSettings):
        raise TypeError(f"LoRA settings must be a LoraSettings or a preset name, not {type(settings).__name__}")

    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=TARGET_REGEX,
    )
    model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    fold_lora_dropout(model)  # the dropout inside lora_A, drawn as the dropped elements' indices
    fuse_lora_linears(model)  # one autograd function per adapted Linear: no input-sized temporaries
    mark_only_lora_trainable(model)
    return model


def is_lora_name(name: str) -> bool:
    return "lora_" in name


def mark_only_lora_trainable(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(is_lora_name(name))


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs of the adapters, in module order."""
    return [(n, p) for n, p in model.named_parameters() if is_lora_name(n)]


def _to_reference_name(peft_name: str) -> str:
    for ours, fragments in _PEFT_SUFFIX.items():
        for fragment in fragments:
            if peft_name.endswith("." + fragment):
                return peft_name[: -len(fragment)] + ours
    raise LoraError(f"{peft_name} is not a LoRA parameter of adapter {ADAPTER!r}")


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors under the reference names (``<module>.lora_A`` / ``.lora_B``), detached."""
    return {_to_reference_name(n): p.detach().clone() for n, p in lora_parameters(model)}


def load_lora_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy adapter tensors (reference names, ``model.`` prefix and ``state_dict`` wrapper
    allowed) into a model that has adapters. Strict: names every missing, unexpected or
    wrongly shaped tensor at once."""
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    state = {k.removeprefix("model."): v for k, v in state.items() if is_lora_name(k)}
    params = {_to_reference_name(n): p for n, p in lora_parameters(model)}
    if not params:
        raise LoraError("the model has no LoRA adapters; call add_lora first")
    problems = state_dict_problems(state, params)
    if problems:
        raise LoraError("LoRA weights do not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k].to(p.dtype))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W + (alpha/r)·BA; embeddings W + (alpha/r)·(BA)ᵀ)
    and put the plain layers back. Idempotent: a model without adapters is returned unchanged."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in wrapped:
        layer.merge(adapter_names=[ADAPTER])  # peft skips (with a warning) if already merged
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    return model


def merged_state_dict(
    base: dict[str, Tensor], adapters: dict[str, Tensor], settings: LoraSettings
) -> dict[str, Tensor]:
    """Pure-tensor merge (for checks): base weights plus scaled BA, in the base's dtypes."""
    out = dict(base)
    for key, a in adapters.items():
        if not key.endswith(".lora_A"):
            continue
        module = key[: -len(".lora_A")]
        b = adapters[module + ".lora_B"]
        w = base[module + ".weight"]
        delta = settings.scaling * (b.double() @ a.double())  # (out, in) | (dim, num)
        if delta.shape != w.shape:
            delta = delta.T  # embedding: weight is (num_embeddings, dim)
        out[module + ".weight"] = (w.double() + delta).to(w.dtype)
    return out


# --- metadata beside the weights -------------------------------------------------------------

METADATA_FILE = "lora.json"


def save_metadata(meta: LoraMetadata, folder: str | Path) -> Path:
    from fish_speech_core.files import atomic_write

    path = Path(folder) / METADATA_FILE
    with atomic_write(path, "w") as handle:
        handle.write(json.dumps(meta.to_dict(), indent=4, sort_keys=True) + "\n")
    return path


@dataclass(frozen=True)
class AdapterFile:
    """An adapter checkpoint as read: tensors (reference names) and metadata (None if absent)."""

    tensors: dict[str, Tensor]
    metadata: LoraMetadata | None = field(default=None)


def read_adapter(path: str | Path) -> AdapterFile:
    """Read our training checkpoints or a reference Lightning LoRA checkpoint
    (``{"state_dict": {"model.<name>.lora_A": ...}}``) with ``weights_only=True``.

    Raises:
        WeightsError: the file is missing or not a torch file of tensors.
        LoraError: it holds no (finite) LoRA tensors, or its metadata is unreadable.

    Metadata comes from the checkpoint's ``fishtune_lora`` entry, else from a ``lora.json``
    beside it, else is None (reference checkpoints carry none).
    """
    path = Path(path)
    data = read_weights(path, mmap=False)
    state = data.get("state_dict", data)
    if not isinstance(state, dict):
        raise LoraError(f"{path}: 'state_dict' is a {type(state).__name__}, not a dict of tensors")
    bad = sorted(k for k, v in state.items() if is_lora_name(k) and not isinstance(v, Tensor))
    if bad:
        raise LoraError(f"{path}: LoRA entries {bad} are not tensors")
    tensors = {k.removeprefix("model."): v for k, v in state.items() if is_lora_name(k)}
    if not tensors:
        raise LoraError(f"{path} holds no LoRA tensors (no key contains 'lora_')")
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise LoraError(f"{path}: LoRA tensors hold NaN or Inf ({len(bad)} tensor(s): {shown}); "
                        "the training diverged or the file is damaged: use an earlier checkpoint")
    raw, source = data.get("fishtune_lora"), f"{path} (fishtune_lora)"
    if raw is None and (path.parent / METADATA_FILE).is_file():
        source = str(path.parent / METADATA_FILE)
        try:
            raw = json.loads((path.parent / METADATA_FILE).read_text(encoding="utf-8"))
        except (ValueError, OSError) as err:
            raise LoraError(f"{source} is not valid JSON ({err}); delete it or restore it from the run") from None
    try:
        meta = LoraMetadata.from_dict(raw) if raw is not None else None
    except LoraError as err:
        raise LoraError(f"{source}: unreadable LoRA metadata: {err}") from None
    return AdapterFile(tensors=tensors, metadata=meta)
