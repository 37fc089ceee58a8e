"""Training checkpoints on disk: atomic writes, finding the newest valid one, picking the best.

A checkpoint is Lightning's dict with ``state_dict`` reduced to the LoRA tensors
(``model.<module>.lora_A/B``, the reference layout), the optimizer/scheduler/loop state, and
``fishtune_lora`` (adapter metadata) + ``fishtune_config`` (the resolved run config).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fish_speech_core.files import DiskFullError, atomic_write, is_abandoned, temporary_target
from fish_speech_core.finetune.steps import CHECKPOINT_RE, checkpoint_name
from fish_speech_core.weights import read_weights

REQUIRED_KEYS = ("state_dict", "global_step", "loops", "optimizer_states", "fishtune_config")
WITHIN = 0.02  # recommend the earliest checkpoint within 2 % of the best val loss


class CheckpointWriteError(DiskFullError):
    """A checkpoint could not be written (disk full); earlier checkpoints are intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO that writes temp + fsync + rename and loads with weights_only=True."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Serialise in memory first (LoRA checkpoints are small) so a full disk surfaces as an
        # OSError with its errno from write(), not as torch's generic RuntimeError.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getbuffer()
        try:
            with atomic_write(path, size=len(data)) as handle:
                handle.write(data)
        except DiskFullError as err:
            raise CheckpointWriteError(
                err.errno, err.detail,
                "free some disk space or lower --save-top-k, then rerun with --resume auto "
                "(earlier checkpoints are intact)",
                str(path),
            ) from None

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        # Always onto the CPU (Lightning moves the state to the device when it restores it).
        return read_weights(path, mmap=False)


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step_*.ckpt`` in ``folder``, oldest first (temp files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def remove_partial_checkpoints(folder: str | Path) -> list[Path]:
    """Delete the temp files of checkpoint writes that a killed run left in ``folder``.

    They are never loaded (:func:`list_checkpoints` only sees complete ``step_*.ckpt`` files);
    this only gives their space back.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        target = temporary_target(path)
        if target is not None and CHECKPOINT_RE.match(target.name) and path.is_file() and is_abandoned(path):
            path.unlink(missing_ok=True)
            removed.append(path)
    return sorted(removed)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint (weights_only) and check it has what resuming needs.

    Raises:
        WeightsError: unreadable; ValueError: not a fishtune training checkpoint.
    """
    data = read_weights(path, mmap=False)
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path} is not a fishtune training checkpoint: missing {missing}")
    if not any("lora_" in k for k in data["state_dict"]):
        raise ValueError(f"{path} holds no LoRA tensors")
    return data


def newest_valid_checkpoint(folder: str | Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that loads, and a note for every newer one that did not."""
    skipped = []
    for _, path in reversed(list_checkpoints(folder)):
        try:
            read_checkpoint(path)
        except Exception as err:  # noqa: BLE001 - any unreadable file is skipped, and named
            skipped.append(f"{path.name}: {err}")
            continue
        return path, skipped
    return None, skipped


@dataclass(frozen=True)
class Recommendation:
    """The earliest checkpoint whose val loss is within 2 % of the best one."""

    step: int
    val_loss: float
    best_step: int
    best_val_loss: float
    checkpoint: str | None  # None when that checkpoint was already rotated away
    note: str


def recommend(history: list[dict], folder: str | Path) -> Recommendation | None:
    """Pick from ``history`` rows ``{"step", "val_loss", ...}`` (step 0 = before training)."""
    rows = [r for r in history if r.get("val_loss") is not None and r["step"] > 0]
    if not rows:
        return None
    best = min(rows, key=lambda r: (r["val_loss"], r["step"]))
    limit = best["val_loss"] * (1 + WITHIN) if best["val_loss"] >= 0 else best["val_loss"] * (1 - WITHIN)
    chosen = min((r for r in rows if r["val_loss"] <= limit), key=lambda r: r["step"])
    present = {step: path for step, path in list_checkpoints(folder)}
    path = present.get(chosen["step"])
    note = f"earliest checkpoint within {WITHIN:.0%} of the best validation loss"
    if path is None:
        kept = [r for r in rows if r["val_loss"] <= limit and r["step"] in present]
        if kept:
            alt = min(kept, key=lambda r: r["step"])
            note += (f"; step {chosen['step']} was rotated away (raise --save-top-k to keep it), "
                     f"step {alt['step']} is the earliest kept one")
            path = present[alt["step"]]
        else:
            note += f"; its checkpoint was rotated away (raise --save-top-k to keep it)"
    return Recommendation(
        step=chosen["step"], val_loss=chosen["val_loss"], best_step=best["step"],
        best_val_loss=best["val_loss"], checkpoint=str(path) if path else None, note=note,
    )
