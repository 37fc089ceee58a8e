"""The one reader of torch weight files: model.pth, codec .pth, LoRA and training checkpoints.

Every file is opened with ``weights_only=True``, so a pickle holding arbitrary objects is refused,
never executed. Large files are memory-mapped (tensors are paged in when used, not copied);
the legacy non-zip ``torch.save`` format cannot be, and is read whole instead.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch


class WeightsError(ValueError):
    """A weights file that cannot be read; the message names the file and the reason."""


def read_weights(path: str | os.PathLike, *, mmap: bool = True) -> dict[str, Any]:
    """``torch.load`` a file onto the CPU with ``weights_only=True`` and check it holds a dict.

    Args:
        mmap: memory-map the file (falls back to a full read for the legacy format). Pass False
            for small files that are read once and then replaced (training checkpoints).

    Raises:
        WeightsError: the file is missing, not a torch file (truncated, garbage), holds objects
            other than tensors and plain containers, or holds something other than a dict.
    """
    file = Path(path)
    if not file.is_file():
        raise WeightsError(f"{file} not found")
    try:
        try:
            data = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as err:
            if not mmap or "mmap" not in str(err):
                raise
            data = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(
            f"refusing to load {file}: it contains objects other than tensors, which could run "
            f"code when unpickled. Re-save it as a plain state dict of tensors. ({err})"
        ) from None
    except Exception as err:  # noqa: BLE001 - any other failure means "not a torch file"
        raise WeightsError(f"could not read {file} as a torch checkpoint: {err}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{file} holds a {type(data).__name__}, not a state dict")
    return data
