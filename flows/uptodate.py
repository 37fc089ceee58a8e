"""Is a finetune run already done? Answered from the store alone, before Prefect starts.

An unchanged rerun in ephemeral mode spent most of its time starting the temporary Prefect
server (its own process importing Prefect's server stack) only to find every stage ``Cached``.
The store is the source of truth (:mod:`fishtune.tasks.stage`), so the answer can come from it:

A run is up to date when the newest completed run manifest with the same parameters and the same
versions (fishtune, torch, Prefect, ...) has every stage's artifact still published, and each of
those artifacts' own metadata (the content hashes its key was made of, and the code version)
still gives its key, with every input hash either a current hash of the run's inputs (data,
base, codec) or the hash of an artifact of an earlier stage of that run. So a changed clip,
base or codec, another parameter, another release, or a deleted artifact is "not up to date",
and the flow runs (and decides stage by stage, as always).

Only the plain local case qualifies: local store and inputs, no pools, no warm start (its init
LoRA depends on what the store holds) and no ``PREFECT_API_URL`` (a running server costs nothing to
use, and a user who set one wants the run recorded there). No Prefect import here.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from fish_speech_core import storage
from fish_speech_core.storage import MARKER, RUNS, StageRecord, Store
from fishtune.flows.config import FinetuneConfig

NEWEST_MANIFESTS = 20  # how many run manifests are read at most, newest first


@dataclass(frozen=True)
class UpToDate:
    """The completed run whose artifacts are all current, and the seconds each stage's check took."""

    run_id: str
    stages: list[StageRecord]
    seconds: list[float]
    manifest: str  # URL of that run's manifest.json
    report: str

    @property
    def merged_model(self) -> str | None:
        return next((s.url for s in self.stages if s.stage == "merge"), None)

    @property
    def chosen_checkpoint(self) -> str | None:
        """What was merged (the previews' pick with evaluate, else train's last checkpoint)."""
        merge = next((s for s in self.stages if s.stage == "merge"), None)
        return merge.inputs.get("checkpoint") if merge else None


def eligible(config: FinetuneConfig) -> bool:
    """The case this check answers for (see the module docstring)."""
    urls = [config.data, config.storage, config.base, config.codec, config.work_dir]
    return (not os.environ.get("PREFECT_API_URL") and not config.gpu_pool and not config.cpu_pool
            and not config.warm_start and all(storage.is_local(u) for u in urls if u))


def up_to_date(config: FinetuneConfig) -> UpToDate | None:
    """The earlier run this one would repeat exactly, or None (then the flow must run)."""
    if not eligible(config):
        return None
    store = Store(config.storage)
    runs = storage.local_path(store.url(RUNS))
    if not runs.is_dir():
        return None
    parameters, versions = config.manifest_parameters(), storage.versions()
    manifests = sorted(runs.glob("*/manifest.json"), key=_mtime, reverse=True)[:NEWEST_MANIFESTS]
    for path in manifests:
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if (found.get("flow") == "finetune" and found.get("status") == "completed"
                and found.get("parameters") == parameters and found.get("versions") == versions):
            return _check(config, found, path)  # the newest such run decides: older ones hold no newer truth
    return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _check(config: FinetuneConfig, manifest: dict, path: Path) -> UpToDate | None:
    known = {storage.hash_any(u) for u in (config.data, config.base, config.codec) if u}
    records, seconds = [], []
    code = storage.code_version()
    for raw in manifest.get("stages", []):
        started = time.perf_counter()
        try:
            record = StageRecord(**raw)
        except TypeError:  # a manifest of another format: let the flow decide
            return None
        metadata = _published_metadata(record)
        if metadata is None:
            return None
        inputs = metadata["inputs"]
        if storage.artifact_key(record.stage, inputs, metadata["params"], code) != record.key:
            return None
        if not set(inputs.values()) <= known:
            return None  # an input changed since (or came from somewhere this run does not name)
        known |= _output_hashes(record)
        records.append(record)
        seconds.append(time.perf_counter() - started)
    if not records:
        return None
    report = path.with_name("report.md")
    return UpToDate(manifest["run_id"], records, seconds, str(path), str(report) if report.is_file() else "")


def _published_metadata(record: StageRecord) -> dict | None:
    """The metadata in the completion marker of the stage's artifact (``<stage>/<key>/``, or the
    merged model's version folder), or None when it is not (or no longer) complete or lacks what
    its key is made of."""
    marker = storage.local_path(storage.join(record.url, MARKER)) if record.url and record.key else None
    try:
        metadata = json.loads(marker.read_text()).get("metadata") if marker is not None else None
    except (OSError, ValueError):
        return None
    if not isinstance(metadata, dict) or not {"inputs", "params"} <= set(metadata):
        return None
    return metadata


def _output_hashes(record: StageRecord) -> set[str]:
    """Content hashes of what a stage handed on: its artifact and the files it named (a checkpoint)."""
    found = set()
    for url in [record.url, *record.outputs.values()]:
        if isinstance(url, str) and url and storage.local_path(url).exists():  # not "shards" (a list)
            found.add(storage.hash_any(url))
    return found
