"""The rule for semantic codes: how many rows, which values, and where that is recorded.

Codes are an integer array (num_codebooks, frames) with every value in ``[0, codebook_size)``.
A codec *produces* codes of a :class:`CodeSpec` (rows = ``n_groups x n_codebooks``, size =
``prod(levels)``); a base LM *accepts* codes of its ``num_codebooks`` and ``codebook_size``.
Extraction records the producing spec in each ``<stem>.npy.json`` sidecar; pack checks every
array against it; train and doctor check that what is produced fits what the base accepts.
One module, so the three stages cannot disagree about the rule.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fish_speech_core.formats.prompt import CODEBOOK_OFFSET

SIDECAR_SUFFIX = ".json"  # x.npy -> x.npy.json
NPY_MAGIC = b"\x93NUMPY"


@dataclass(frozen=True)
class CodeSpec:
    """Codes have ``num_codebooks`` rows; every value lies in ``[0, codebook_size)``."""

    num_codebooks: int
    codebook_size: int

    @classmethod
    def from_levels(cls, num_codebooks: int, levels: tuple[int, ...]) -> "CodeSpec":
        """What an FSQ quantizer with ``levels`` per codebook produces."""
        return cls(num_codebooks, math.prod(levels))


# Codes without a sidecar (e.g. written by Fish Speech's own extract): 8 rows of values < 1024,
# what the reference packer accepts (its codec only makes values < 1000). Whether they fit a base
# (training stores code + 1, so at most codebook_size - 2) is train's check, fit_problems.
DEFAULT_SPEC = CodeSpec(num_codebooks=8, codebook_size=1024)


def sidecar_path_for(npy_path: Path) -> Path:
    return npy_path.with_name(npy_path.name + SIDECAR_SUFFIX)


def read_npy(path: Path) -> np.ndarray:
    """The array in an ``.npy`` file, memory-mapped: a header that claims more data than the
    file holds is an error here, never a huge allocation; pickled objects are refused.

    Raises:
        ValueError: the file is empty, not an ``.npy`` array, or shorter than its header says.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ValueError("empty file (0 bytes), not an .npy array")
        with open(path, "rb") as handle:
            if handle.read(len(NPY_MAGIC)) != NPY_MAGIC:  # np.load would also try zip and pickle
                raise ValueError("not an .npy file (no NUMPY header): damaged, or another format")
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except ValueError as err:
        if str(err).startswith(("empty file", "not an .npy file")):
            raise
        if "mmap length" in str(err):
            raise ValueError(f"its header claims shape {_header_shape(path)}, more data than the "
                             f"{path.stat().st_size}-byte file holds (truncated or damaged)") from None
        raise ValueError(f"not a readable .npy array ({err})") from None
    except (EOFError, OSError) as err:
        raise ValueError(f"not a readable .npy array ({type(err).__name__}: {err})") from None
    if not isinstance(array, np.ndarray):  # np.load opens .npz archives too
        raise ValueError(f"holds a {type(array).__name__}, not one .npy array")
    return array


def _header_shape(path: Path) -> tuple[int, ...] | str:
    from numpy.lib import format as npy_format

    try:
        with open(path, "rb") as handle:
            version = npy_format.read_magic(handle)
            read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
            shape, _, _ = read(handle)  # the header only
        return shape
    except Exception:  # noqa: BLE001 - only used to word the message
        return "unknown"


def recorded_spec(npy_path: Path) -> CodeSpec | None:
    """The spec that extraction recorded beside ``npy_path``, or None (no or old sidecar)."""
    try:
        record = json.loads(sidecar_path_for(npy_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    rows, size = record.get("num_codebooks"), record.get("codebook_size")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (rows, size)):
        return None
    return CodeSpec(rows, size)


def array_problem(codes: np.ndarray, spec: CodeSpec) -> str | None:
    """Why ``codes`` cannot be codes of ``spec`` (dtype, shape, rows, value range), or None."""
    if not np.issubdtype(codes.dtype, np.integer):
        return f"codes have dtype {codes.dtype}, expected integers"
    if codes.ndim != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
        return f"codes have shape {codes.shape}, expected (num_codebooks, frames) with both > 0"
    if codes.shape[0] != spec.num_codebooks:
        return f"codes have {codes.shape[0]} codebook rows, the codec makes {spec.num_codebooks}"
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= spec.codebook_size:
        bad = low if low < 0 else high
        return f"code value {bad} is outside [0, {spec.codebook_size}) (codebook size {spec.codebook_size})"
    return None


def fit_problems(produced: CodeSpec, num_codebooks: int, codebook_size: int) -> list[str]:
    """Why codes of ``produced`` do not fit a base LM with these two config fields.

    The LM embeds each row in its own codebook and predicts ``num_codebooks`` rows, so the row
    counts must be equal; training stores ``code + CODEBOOK_OFFSET``, so a code whose stored value
    reaches ``codebook_size`` indexes outside its embedding.
    """
    problems = []
    if produced.num_codebooks != num_codebooks:
        problems.append(f"codes have {produced.num_codebooks} codebook rows but the base model's "
                        f"num_codebooks is {num_codebooks}")
    if produced.codebook_size + CODEBOOK_OFFSET > codebook_size:
        largest = produced.codebook_size - 1
        problems.append(f"codes up to {largest} (stored as code + {CODEBOOK_OFFSET} = {largest + CODEBOOK_OFFSET}) "
                        f"would index past the base model's codebook_size {codebook_size}")
    return problems


__all__ = ["DEFAULT_SPEC", "CodeSpec", "array_problem", "fit_problems", "read_npy", "recorded_spec",
           "sidecar_path_for"]
