"""Checkpoint file names and the training step in them (no torch: flows and reports read these)."""

from __future__ import annotations

import re
from pathlib import PurePath

CHECKPOINT_RE = re.compile(r"^step_(\d{9})\.ckpt$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:09d}.ckpt"


def checkpoint_step(name: str | PurePath) -> int:
    """The step of ``step_000000010.ckpt`` (a path or URL ending in one): 10.

    Raises:
        ValueError: the name is not a checkpoint name.
    """
    found = CHECKPOINT_RE.match(PurePath(str(name)).name)
    if found is None:
        raise ValueError(f"not a checkpoint name (step_NNNNNNNNN.ckpt): {PurePath(str(name)).name}")
    return int(found.group(1))
