"""The merge half of a sharded stage (extract, normalize): the union of its shards' artifacts.

A shard artifact keeps, in its summary, one entry per item it holds (``per_item``: e.g. seconds
of audio). The union refuses shards of different inputs (an item in two shards) and a split that
left an item out, so what the merge publishes is exactly one run's files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fish_speech_core import storage
from fish_speech_core.storage import Store, redact
from fishtune.tasks.stage import Stage


def union_of_shards(store_root: str, shard_stage: Stage, shard_keys: Sequence[str], tmp: Path, per_item: str,
                    expected: Iterable[str], source: str) -> tuple[dict[str, Path], dict[str, Any]]:
    """(every file of the ``shard_stage`` artifacts ``shard_keys`` but their summaries, the union
    of their summaries' ``per_item`` dicts). Remote files are downloaded under ``tmp``.

    Raises:
        ValueError: a shard artifact is missing, an item is in two shards, or an item of
            ``expected`` (the items of ``source``, for the message) is in none.
    """
    store = Store(store_root)
    items: dict[str, Any] = {}
    files: dict[str, Path] = {}
    for number, key in enumerate(shard_keys):
        artifact = store.lookup(shard_stage.name, key)
        if artifact is None:
            raise ValueError(f"shard artifact {redact(store.artifact_url(shard_stage.name, key))} is not in the store")
        mine = json.loads(store.read_bytes(f"{shard_stage.name}/{key}/{shard_stage.summary_file}"))[per_item]
        twice = set(items) & set(mine)
        if twice:
            raise ValueError(f"{sorted(twice)[0]} is in two shards: the shards are of different inputs")
        items.update(mine)
        for rel in artifact.files:
            if rel != shard_stage.summary_file:
                files[rel] = _local_copy(artifact.file_url(rel), tmp / f"shard-{number}" / rel)
    missing = set(expected) - set(items)
    if missing:
        raise ValueError(f"{len(missing)} item(s) of {redact(source)} are in no shard, e.g. {sorted(missing)[0]}")
    return files, items


def _local_copy(url: str, target: Path) -> Path:
    """A local file with the bytes of ``url``: itself when local, else downloaded to ``target``."""
    if storage.is_local(url):
        return storage.local_path(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    return storage.download(url, target)
