"""Checkpoint folders of the dual-AR model: the one place that reads and writes them.

A folder holds ``config.json`` (:class:`DualARConfig`, sorted keys, 4-space indent),
``model.pth`` (a flat ``torch.save``d state dict) and the tokenizer files
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``), the layout
Fish Speech 1.4 reads and writes.

Reading accepts what Fish Speech and Lightning produce: a ``{"state_dict": ...}`` wrapper,
keys prefixed ``model.``, and separate ``wq``/``wk``/``wv`` projections (fused into ``wqkv``).
Loading is strict: missing keys, unexpected keys and wrong shapes are reported together, by
name. The file is read by :func:`fish_speech_core.weights.read_weights` (``weights_only=True``).
Loading never adds LoRA adapters: callers wrap the model with ``finetune.lora.add_lora``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fish_speech_core.files import atomic_torch_save, atomic_write
from fish_speech_core.lm.config import DualARConfig
from fish_speech_core.lm.model import AttentionImpl, DualARTransformer
from fish_speech_core.meta import on_meta
from fish_speech_core.tokenizer import FishTokenizer
from fish_speech_core.weights import WeightsError, read_weights

CONFIG_FILE = "config.json"
MODEL_FILE = "model.pth"
LIGHTNING_PREFIX = "model."
# Separate projections some checkpoints carry, fused in this order into ``wqkv``.
UNFUSED_QKV = ("wq", "wk", "wv")


class CheckpointError(WeightsError):
    """A checkpoint folder that cannot be loaded as it is; the message says why.

    A :class:`WeightsError`, so one ``except WeightsError`` covers unreadable files too.
    """


@dataclass
class Pretrained:
    """What :func:`load_pretrained` returns: the model, its tokenizer and the folder they came from.

    The model does not hold the tokenizer: pass ``tokenizer`` to :func:`save_pretrained`.
    """

    model: DualARTransformer
    tokenizer: FishTokenizer
    path: Path


def normalize_state_dict(data: dict) -> dict[str, Tensor]:
    """Unwrap ``{"state_dict": ...}``, strip the ``model.`` prefix and fuse wq/wk/wv into wqkv."""
    if isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    not_tensors = sorted(k for k, v in data.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise CheckpointError(f"state dict entries {not_tensors} are not tensors")
    state = {
        (k[len(LIGHTNING_PREFIX):] if k.startswith(LIGHTNING_PREFIX) else k): v
        for k, v in data.items()
    }
    for key in [k for k in state if k.endswith(".attention.wq.weight")]:
        prefix = key[: -len("wq.weight")]
        for suffix in ("weight", "bias"):
            parts = [f"{prefix}{name}.{suffix}" for name in UNFUSED_QKV]
            present = [p for p in parts if p in state]
            if not present:
                continue
            if len(present) != 3:
                missing = sorted(set(parts) - set(present))
                raise CheckpointError(f"cannot fuse {present} into wqkv: missing {missing}")
            state[f"{prefix}wqkv.{suffix}"] = torch.cat([state.pop(p) for p in parts], dim=0)
    return state


def state_dict_problems(state: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> list[str]:
    """Every way ``state`` fails to fit ``expected`` (missing / unexpected keys, shapes, dtypes).

    One strict comparison for every checkpoint fishtune loads into a model (base weights, LoRA).
    """
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    for key, tensor in state.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            problems.append(f"{key} has shape {tuple(tensor.shape)}, the model needs {tuple(expected[key].shape)}")
        elif key in expected and not tensor.is_floating_point():
            problems.append(f"{key} has dtype {tensor.dtype}, expected a floating point tensor")
    return problems


def load_state_dict(
    model: DualARTransformer, state: dict[str, Tensor], dtype: torch.dtype | None = None
) -> None:
    """Strictly load ``state`` into ``model`` by assignment (no copy; works on a meta model).

    Args:
        dtype: cast every tensor to this dtype; None keeps the checkpoint's dtypes.

    Raises:
        CheckpointError: naming every missing key, unexpected key and wrong shape at once.
    """
    expected = model.state_dict()
    problems = state_dict_problems(state, expected)
    if problems:
        raise CheckpointError(
            "weights do not match the model config: " + "; ".join(problems)
            + ". Check that config.json belongs to this model.pth."
        )
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)


def load_pretrained(
    path: str | os.PathLike,
    attention_impl: AttentionImpl = "sdpa",
    dtype: torch.dtype | None = None,
) -> Pretrained:
    """Load a checkpoint folder: config.json, model.pth and the tokenizer.

    Args:
        path: the folder.
        attention_impl: "sdpa" or "explicit", see :class:`DualARTransformer`.
        dtype: cast the weights (e.g. ``torch.float32`` for training); None keeps the file's
            dtypes, so load -> save -> load is lossless.

    Raises:
        CheckpointError / WeightsError / ConfigError / TokenizerError: naming the file and what
            to do.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder} is not a folder; pass a checkpoint folder holding {CONFIG_FILE}, "
            f"{MODEL_FILE} and tokenizer.json (see `fishtune download` / `fishtune init-base`)"
        )
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(
                f"{folder / name} not found: a checkpoint folder needs {CONFIG_FILE}, "
                f"{MODEL_FILE} and tokenizer.json"
            )
    config = DualARConfig.from_file(folder / CONFIG_FILE)
    tokenizer = FishTokenizer.from_dir(folder)
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(
            f"the tokenizer in {folder} has {len(tokenizer)} tokens but vocab_size is "
            f"{config.vocab_size}; config.json and tokenizer.json do not belong together"
        )
    state = normalize_state_dict(read_weights(folder / MODEL_FILE))
    # Build without allocating or initialising weights: they are assigned from the file.
    with on_meta():
        model = DualARTransformer(config, tokenizer.semantic_id, attention_impl)
    try:
        load_state_dict(model, state, dtype)
    except CheckpointError as err:
        raise CheckpointError(f"{folder / MODEL_FILE}: {err}") from None
    model.reset_buffers("cpu")
    return Pretrained(model=model, tokenizer=tokenizer, path=folder)


def save_pretrained(model: DualARTransformer, path: str | os.PathLike, tokenizer: FishTokenizer) -> None:
    """Write config.json, model.pth and the tokenizer files into ``path``, each atomically.

    Raises:
        CheckpointError: the tokenizer's ``<|semantic|>`` id is not the model's.
    """
    if tokenizer.semantic_id != model.semantic_token_id:
        raise CheckpointError(
            f"the tokenizer's <|semantic|> id {tokenizer.semantic_id} differs from the model's "
            f"semantic_token_id {model.semantic_token_id}"
        )
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(folder)
    with atomic_write(folder / CONFIG_FILE, "w") as handle:
        handle.write(model.config.to_json())
    # model.pth last: a folder that has it is complete.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save(state, folder / MODEL_FILE)
