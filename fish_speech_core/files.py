"""Small file-system helpers shared by every stage: atomic writes, hashing, safe paths.

Every output fishtune writes goes through :func:`atomic_write` (or :func:`atomic_path`), so a
crash leaves either the old file or the complete new one, never a half-written file that a
rerun could take for finished work.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

HASH_CHUNK = 1 << 20  # 1 MiB: streams large audio files without loading them whole


class PathEscapeError(ValueError):
    """A path taken from data resolves outside the root it must stay in."""


def sha256_file(path: str | os.PathLike, chunk_size: int = HASH_CHUNK) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the destination folder; rename it onto ``path`` on success.

    For writers that want a file name rather than a handle (soundfile, torch.save, numpy).
    The temporary name keeps the final suffix so format detection by extension still works.
    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}"
    )
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; published files are readable like any other
    try:
        yield tmp
        with open(tmp, "rb+") as handle:  # make the bytes durable before the rename publishes them
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file for writing and rename it onto ``path`` when the block succeeds."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write supports modes 'w' and 'wb', not {mode!r}")
    with atomic_path(path) as tmp:
        encoding = None if "b" in mode else "utf-8"
        with open(tmp, mode, encoding=encoding) as handle:
            yield handle


def is_temporary(path: Path) -> bool:
    """True for the leftovers of an interrupted :func:`atomic_path` (never real inputs)."""
    return path.name.startswith(".") and ".tmp" in path.name


def resolve_inside(root: str | os.PathLike, candidate: str | os.PathLike) -> Path:
    """Resolve ``candidate`` (relative to ``root`` unless absolute) and require it inside ``root``.

    Symlinks are followed, so a link whose target leaves the root is refused as well.

    Raises:
        PathEscapeError: naming the path and where it resolves to.
    """
    root_resolved = Path(root).resolve()
    path = Path(candidate)
    if not path.is_absolute():
        path = Path(root) / path
    resolved = path.resolve()
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise PathEscapeError(f"{candidate} resolves to {resolved}, outside {root_resolved}")
    return resolved


def has_control_characters(text: str) -> bool:
    """Newlines, tabs and other control characters never belong in a file or folder name."""
    return any(ord(ch) < 32 or ord(ch) == 127 for ch in text)
