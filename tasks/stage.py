"""One key per stage, and the preamble every stage task shares.

A stage's key is the sha256 of its inputs' content hashes, its parameter model's key fields and
the fishtune version (``storage.artifact_key``). The same key is the Prefect cache key (so a rerun
shows ``Cached`` and two runs wait on one lock) and the store folder ``<root>/<stage>/<key>/``
the artifact is published to. Content hashes are memoized by the storage layer (size + mtime or
ETag), so computing the key twice in one run reads no byte twice.

The store is the source of truth: a task whose Prefect cache record is gone (a new Prefect
database, another result store) still finds the published artifact under the same key and
reuses it instead of computing again.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from prefect.cache_policies import CachePolicy

from fish_speech_core import storage
from fish_speech_core.storage import Artifact, Store

Files = Path | Mapping[str, Path]  # a folder, or {relative path in the artifact: local file}


@dataclass(frozen=True)
class Stage:
    """A stage's name, which task arguments are content inputs, and where its summary is kept.

    ``inputs`` maps the name recorded in the key and the metadata to the task argument holding a
    file or folder URL (an unset optional input is left out). ``hash_inputs``, when set, replaces
    that: task arguments -> content hashes (e.g. only a shard's files of a folder).
    """

    name: str
    inputs: Mapping[str, str]
    summary_file: str = "summary.json"
    hash_inputs: Callable[[Mapping[str, Any]], dict[str, str]] | None = None

    def input_hashes(self, args: Mapping[str, Any]) -> dict[str, str]:
        if self.hash_inputs is not None:
            return self.hash_inputs(args)
        return {name: storage.hash_any(str(args[arg])) for name, arg in self.inputs.items() if args.get(arg)}

    def describe(self, args: Mapping[str, Any]) -> tuple[dict[str, str], str]:
        """(input content hashes, key) of ``args``: the task's arguments (input URLs by argument name, and ``params``)."""
        params = args.get("params")
        hashes = self.input_hashes(args)
        return hashes, storage.artifact_key(self.name, hashes, params.key_fields() if params else {},
                                            storage.code_version())

    def key(self, args: Mapping[str, Any]) -> str:
        return self.describe(args)[1]

    @property
    def cache_policy(self) -> CachePolicy:
        return StageKey(stage=self)

    @property
    def launch_policy(self) -> CachePolicy:
        """The key of the task that launches this stage as a child run: the stage key, prefixed.

        Its own record (the child's result) and its own lock: the launcher holds its lock while the
        child runs, and the child takes the stage key's lock on the same lock folder when the
        store is local; one key for both would deadlock."""
        return StageKey(stage=self, prefix="launch-")

    def run(self, store_root: str, args: Mapping[str, Any], compute: Callable[[Path], tuple[Files, dict]]) -> Outcome:
        """Reuse the published artifact of this key, or ``compute(tmp)`` -> (files, summary) and publish.

        ``compute`` may write helper files in ``tmp``; the summary is stored in the artifact as
        ``summary_file`` and read back on reuse.
        """
        store = Store(store_root)
        params = args.get("params")
        hashes, key = self.describe(args)
        artifact = store.lookup(self.name, key)
        if artifact is not None:
            summary = json.loads(store.read_bytes(f"{self.name}/{key}/{self.summary_file}"))
            return Outcome(self, key, hashes, artifact, summary, reused=True)
        with tempfile.TemporaryDirectory() as tmp:
            files, summary = compute(Path(tmp))
            listed = _as_mapping(files)
            (Path(tmp) / self.summary_file).write_text(json.dumps(summary, indent=2, ensure_ascii=False))
            listed[self.summary_file] = Path(tmp) / self.summary_file
            metadata = {"inputs": hashes, "params": params.key_fields() if params else {}}
            artifact = store.publish(self.name, key, listed, metadata=metadata)
        return Outcome(self, key, hashes, artifact, summary, reused=False)


@dataclass(frozen=True)
class Outcome:
    """What :meth:`Stage.run` found or made; ``result`` is the small dict a task returns."""

    stage: Stage
    key: str
    inputs: dict[str, str]
    artifact: Artifact
    summary: dict
    reused: bool

    def result(self, summary: dict, **outputs: Any) -> dict:
        return {"stage": self.stage.name, "key": self.key, "url": self.artifact.url, "inputs": self.inputs,
                **outputs, "summary": {**summary, "reused_artifact": self.reused}}


@dataclass
class StageKey(CachePolicy):
    """The Prefect cache policy of a stage: its store key."""

    stage: Stage | None = None
    prefix: str = ""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        return self.prefix + self.stage.key(inputs)


def _as_mapping(files: Files) -> dict[str, Path]:
    if isinstance(files, Mapping):
        return dict(files)
    root = Path(files)
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def run_logger(fallback: str):
    """The run logger inside a Prefect run (lines reach the UI); a plain logger when a task body
    runs through ``.fn()`` outside any run."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        return logging.getLogger(fallback)


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) from its parts."""
    return re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())[:100]
