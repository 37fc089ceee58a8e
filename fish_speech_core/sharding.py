"""Split a dataset's items into K shards, the same way on every host and in every run.

An item is named by its relative path without the extension (``alice/alice_001``), so a clip
and its transcript always land together. Its shard is the sha256 of that name modulo K: adding
or removing one clip changes the file list of its own shard only (contiguous ranges of the
sorted list would shift every later boundary), and changing a clip's bytes keeps it where it is
(a content hash would move it, changing two shards). The price: shards are balanced only on
average (about N/K +- sqrt(N/K) items), and a shard may be empty for tiny datasets.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import TypeVar

V = TypeVar("V")


def item_name(rel: str) -> str:
    """``speaker/clip.wav`` -> ``speaker/clip``: what decides the shard of a clip and its transcript."""
    head, _, name = rel.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    return f"{head}/{stem}" if head else stem


def shard_of(item: str, shards: int) -> int:
    """The shard (0-based) of an item name, stable across hosts, runs and Python versions."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    return int.from_bytes(hashlib.sha256(item.encode("utf-8")).digest()[:8], "big") % shards


def split(items: Iterable[str], shards: int) -> list[list[str]]:
    """Item names -> ``shards`` sorted lists (some may be empty); each item in exactly one."""
    out: list[list[str]] = [[] for _ in range(shards)]
    for item in sorted(set(items)):
        out[shard_of(item, shards)].append(item)
    return out


def shard_files(listing: Mapping[str, V], shard: int, shards: int) -> dict[str, V]:
    """The entries of ``listing`` (relative path -> anything, e.g. a hash) whose item is in shard
    ``shard`` (0-based) of ``shards``: every file goes with its item (:func:`item_name`)."""
    return {rel: value for rel, value in listing.items() if shard_of(item_name(rel), shards) == shard}


def shards_for(items: int, per_shard: int, most: int) -> int:
    """K for ``items`` items: one shard per ``per_shard`` items (rounded up), at least 1, at most ``most``."""
    return max(1, min(most, -(-items // per_shard)))
