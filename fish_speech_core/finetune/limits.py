"""What a base checkpoint allows a run to ask for, checked before anything heavy is loaded.

Kept free of Lightning so the CLI can refuse a bad request in the time it takes to start.
"""

from __future__ import annotations

from pathlib import Path

# --max-length when not given: the recipe's 4096, or the base's max_seq_len if that is shorter.
DEFAULT_MAX_LENGTH = 4096


class TrainError(ValueError):
    """A run that cannot start as asked; the message says what to change."""


def base_max_seq_len(base: str | Path) -> int:
    """``max_seq_len`` from a base folder's config.json.

    Raises:
        TrainError: no readable config.json.
    """
    from fish_speech_core.lm import ConfigError, DualARConfig
    from fish_speech_core.lm.checkpoint import CONFIG_FILE

    path = Path(base) / CONFIG_FILE
    try:
        value = DualARConfig.from_file(path).max_seq_len
    except (ConfigError, OSError, ValueError, TypeError) as err:
        raise TrainError(f"--base {base} is not a Fish Speech 1.4 checkpoint folder: {err}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TrainError(f"--base {base} is not a Fish Speech 1.4 checkpoint folder: {path}: "
                         f"max_seq_len must be a positive integer, got {value!r}")
    return value


def resolve_max_length(requested: int | None, max_seq_len: int, base: str | Path,
                       default: int = DEFAULT_MAX_LENGTH, flag: str = "--max-length") -> int:
    """The sample length to train with: ``requested``, else ``min(default, max_seq_len)``.

    Raises:
        TrainError: ``requested`` is longer than the base can attend to (one line, both numbers).
    """
    if requested is None:
        return min(default, max_seq_len)
    if requested > max_seq_len:
        raise TrainError(
            f"{flag} {requested} is longer than the base's max_seq_len {max_seq_len} "
            f"({str(base).rstrip('/')}/config.json): pass {flag} {max_seq_len} or less, or leave it out "
            f"(default: min({default}, max_seq_len))"
        )
    return requested
