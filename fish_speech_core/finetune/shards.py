"""Do these shards fit this base model? Checked before any model is built (Lightning-free, so
the CLI runs it the moment it starts, as ``train`` does before building anything).

Without it a code row too many or a value at or past ``codebook_size`` surfaces minutes later
as an ``IndexError`` inside the embedding, naming no file. The rule itself is
:func:`fish_speech_core.codes.fit_problems` (the one ``doctor`` applies to base vs codec).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from fish_speech_core.codes import CodeSpec, fit_problems
from fish_speech_core.finetune.limits import TrainError
from fish_speech_core.formats.protos import find_proto_files, iter_records, parse_text_data

MAX_REPORTED = 3  # shards named in one error; the rest are counted


def check_data_fits_base(base: str | os.PathLike, data: Iterable[str | os.PathLike]) -> None:
    """The shards' codes fit the base's ``num_codebooks`` and ``codebook_size``.

    Raises:
        TrainError: naming the shard and sentence, or the unreadable config.json / shard.
    """
    from fish_speech_core.lm import ConfigError, DualARConfig

    try:
        config = DualARConfig.from_file(Path(base) / "config.json")
    except (ConfigError, OSError) as err:
        raise TrainError(f"--base {base} is not a Fish Speech 1.4 checkpoint folder: {err}") from None
    try:
        problems = shard_problems(data, config.num_codebooks, config.codebook_size)
    except (ValueError, OSError) as err:  # missing or damaged shards
        raise TrainError(f"--data: {err}") from None
    if problems:
        raise TrainError(
            f"--data does not fit the base model {base} (num_codebooks {config.num_codebooks}, "
            f"codebook_size {config.codebook_size}): {describe(problems)}; extract the codes with the "
            "codec that belongs to this base and pack again"
        )


def shard_problems(paths: str | os.PathLike | Iterable[str | os.PathLike], num_codebooks: int,
                   codebook_size: int) -> list[str]:
    """One line per shard whose codes do not fit ``num_codebooks`` x ``codebook_size``.

    Each names the shard, the record (speaker) and the first sentence that does not fit.

    Raises:
        FileNotFoundError: no shards. ProtoStreamError: a damaged shard or sentence.
    """
    problems = []
    for path in find_proto_files(paths):
        problem = _first_problem(path, num_codebooks, codebook_size)
        if problem:
            problems.append(f"{path}: {problem}")
    return problems


def _first_problem(path, num_codebooks: int, codebook_size: int) -> str | None:
    for offset, payload in iter_records(path):
        record = parse_text_data(payload, f"{path}: record at byte offset {offset}")
        for index, sentence in enumerate(record.sentences):
            rows = [np.asarray(row.values, dtype=np.int64) for row in sentence.semantics]
            spec = CodeSpec(len(rows), max(int(r.max()) for r in rows) + 1)
            problems = fit_problems(spec, num_codebooks, codebook_size)
            if problems:
                return f"speaker {record.name!r} sentence {index}: {'; '.join(problems)}"
    return None


def describe(problems: list[str]) -> str:
    """The problems as one line (the first few shards, then a count)."""
    shown = "; ".join(problems[:MAX_REPORTED])
    more = len(problems) - MAX_REPORTED
    return shown + (f"; and {more} more shard(s)" if more > 0 else "")
