"""Thin Prefect tasks for semantic-token extraction (Firefly VQ-GAN): normalized audio -> codes.

The task syncs the normalize artifact into a stable local work folder and extracts there:
extraction is incremental by content (a sidecar per ``.npy``), so one changed file of a
hundred is encoded again, not the hundred. It publishes ``<speaker>/<stem>.lab`` +
``<stem>.npy`` (+ the ``.npy.json`` sidecar naming the codec's code spec) per item: exactly
what ``pack`` reads.

Sharded extraction (several GPU workers): :func:`extract_shard_task` encodes the items of one
shard (:mod:`fish_speech_core.sharding`) and publishes them as an ``extract-shard`` artifact
keyed by those items' content; :func:`merge_shards` publishes their union under the one
``extract`` key, byte for byte what :func:`extract_task` publishes for the same input (the
summary holds only what the content decides, never timings or per-run counts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect import task

from fish_speech_core import storage
from fish_speech_core.sharding import item_name, shard_files
from fish_speech_core.storage import local_file, redact, sync_tree
from fishtune.tasks.params import ExtractParams
from fishtune.tasks.runtime import work_folder
from fishtune.tasks.shards import union_of_shards
from fishtune.tasks.stage import Stage

DERIVED = (".npy", ".npy.json")  # made here, kept across syncs
SUMMARY = "extract-summary.json"


def shard_items(normalized_url: str, shard: int, shards: int, text_extension: str) -> dict[str, str]:
    """Relative path -> sha256 of the audio files and transcripts of shard ``shard`` (0-based) of ``shards``."""
    from fish_speech_core.audio import AUDIO_EXTENSIONS

    listing = storage.file_hashes(normalized_url)
    # a normalize artifact holds accepted items only: each audio file has its transcript
    kept = {rel: sha for rel, sha in listing.items() if Path(rel).suffix.lower() in AUDIO_EXTENSIONS or rel.endswith(text_extension)}
    return shard_files(kept, shard, shards)


def _shard_hashes(args: Mapping[str, Any]) -> dict[str, str]:
    # the shard's own files, not the whole normalize artifact: a new clip elsewhere keeps this key
    params = args.get("params") or ExtractParams()
    files = shard_items(str(args["normalized_url"]), int(args["shard"]), int(args["shards"]), params.text_extension)
    return {"items": storage.digest_listing(files), "codec": storage.hash_any(str(args["codec"]))}


EXTRACT = Stage("extract", {"normalized": "normalized_url", "codec": "codec"}, summary_file=SUMMARY)
EXTRACT_SHARD = Stage("extract-shard", {"normalized": "normalized_url", "codec": "codec"}, summary_file=SUMMARY,
                      hash_inputs=_shard_hashes)


def codes_summary(seconds: Mapping[str, float]) -> dict:
    """The summary an extract artifact stores: decided by its items alone (sums in sorted order,
    so a merge of shards adds the same floats in the same order as one run)."""
    return {"files": len(seconds), "audio_seconds": round(sum(seconds[k] for k in sorted(seconds)), 3)}


def _encode(local: Path, codec: str, params: ExtractParams, label: str) -> tuple[dict[str, Path], dict[str, float], dict]:
    """Encode every audio file under ``local``; (files to publish, seconds per item, run counts)."""
    import torch

    from fish_speech_core.audio import AUDIO_EXTENSIONS
    from fish_speech_core.codec import load_codec
    from fish_speech_core.codec.extract import ExtractSettings, batching_for, extract
    from fish_speech_core.codes import SIDECAR_SUFFIX, sidecar_path_for

    device = params.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_codec(local_file(codec, local.parent / "checkpoints"), device=device, decoder=False)
    audio = sorted(p for p in local.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(local).parts))
    batch_size, max_batch_seconds = batching_for(device, params.batch_size)
    summary = extract(model, audio, ExtractSettings(batch_size=batch_size, max_batch_seconds=max_batch_seconds,
                                                    num_workers=params.num_workers,
                                                    max_seconds=params.max_seconds, dtype=params.dtype.value))
    bad = [r for r in summary.results if r.status in ("failed", "rejected")]
    if bad:
        listed = "; ".join(f"{r.audio_path.relative_to(local)}: {r.reason}" for r in bad[:5])
        raise RuntimeError(f"extract could not encode {len(bad)} file(s) of {label}: {listed}")
    seconds = {r.audio_path.relative_to(local).with_suffix("").as_posix(): r.seconds for r in summary.results}
    files: dict[str, Path] = {}
    for path in audio:
        rel = path.relative_to(local).with_suffix("").as_posix()
        files[f"{rel}.npy"] = path.with_suffix(".npy")
        files[f"{rel}{params.text_extension}"] = path.with_suffix(params.text_extension)
        sidecar = sidecar_path_for(path.with_suffix(".npy"))
        if sidecar.is_file():  # the codec's code spec: pack checks every .npy against it
            files[f"{rel}.npy{SIDECAR_SUFFIX}"] = sidecar
    counts = {status: summary.count(status) for status in ("extracted", "skipped")}
    return files, seconds, counts


@task(name="extract", cache_policy=EXTRACT.cache_policy, persist_result=True)
def extract_task(normalized_url: str, codec: str, store_root: str, params: ExtractParams = ExtractParams(),
                 workspace: str = "default", work_dir: str | None = None) -> dict:
    """Encode every normalized file to ``(8, frames)`` codes; publish transcripts + codes.

    ``workspace`` names the incremental folder ``<work>/extract/<workspace>/`` on the host that
    runs this (the flow names it after the dataset, so the next run over it redoes changed files only).
    """
    counts = {"extracted": 0, "skipped": 0}  # this run's work; 0/0 when the artifact is reused

    def compute(tmp: Path):
        local = work_folder(store_root, work_dir) / "extract" / workspace
        sync_tree(normalized_url, local, keep_suffixes=DERIVED)
        files, seconds, done_counts = _encode(local, codec, params, redact(normalized_url))
        counts.update(done_counts)
        return files, codes_summary(seconds)

    done = EXTRACT.run(store_root, {"normalized_url": normalized_url, "codec": codec, "params": params}, compute)
    return done.result({**done.summary, **counts})


@task(name="extract-shard", cache_policy=EXTRACT_SHARD.cache_policy, persist_result=True)
def extract_shard_task(normalized_url: str, codec: str, store_root: str, shard: int, shards: int,
                       params: ExtractParams = ExtractParams(), workspace: str = "default",
                       work_dir: str | None = None) -> dict:
    """Encode the items of shard ``shard`` (0-based) of ``shards``; publish their transcripts + codes.

    The key is the shard's files' content (not its number): the same items make the same shard
    artifact whatever K split them. Its incremental folder is ``<work>/extract/<workspace>-<shard>-of-<shards>``.
    """
    counts = {"extracted": 0, "skipped": 0}
    args = {"normalized_url": normalized_url, "codec": codec, "shard": shard, "shards": shards, "params": params}

    def compute(tmp: Path):
        wanted = shard_items(normalized_url, shard, shards, params.text_extension)
        if not wanted:
            raise ValueError(f"shard {shard + 1} of {shards} of {redact(normalized_url)} holds no audio")
        local = work_folder(store_root, work_dir) / "extract" / f"{workspace}-{shard + 1}-of-{shards}"
        sync_tree(normalized_url, local, keep_suffixes=DERIVED, files=wanted)
        files, seconds, done_counts = _encode(local, codec, params, redact(normalized_url))
        counts.update(done_counts)
        return files, {**codes_summary(seconds), "seconds": seconds}

    done = EXTRACT_SHARD.run(store_root, args, compute)
    summary = {k: done.summary[k] for k in ("files", "audio_seconds")}
    return done.result({**summary, **counts})


@task(name="extract-merge", cache_policy=EXTRACT.launch_policy, persist_result=True)
def merge_shards(normalized_url: str, codec: str, store_root: str, params: ExtractParams = ExtractParams(),
                 shard_keys: Sequence[str] = (), counts: Mapping[str, int] | None = None) -> dict:
    """Publish the union of the ``extract-shard`` artifacts ``shard_keys`` as the ``extract``
    artifact of ``normalized_url``: the same files and bytes one run publishes.

    Keyed like the one-run launcher (the ``extract`` key, prefixed): whichever K made the
    artifact, the next run finds it. With the artifact published already, ``shard_keys`` may be
    empty (nothing is merged). ``counts``: the shards' files encoded and reused in this run
    (for the report), recorded in the result only.

    Raises:
        ValueError: a shard artifact is missing, an item is in two shards, or a normalized item is in none.
    """
    from fish_speech_core.audio import AUDIO_EXTENSIONS

    def compute(tmp: Path):
        expected = {item_name(rel) for rel in storage.file_hashes(normalized_url) if Path(rel).suffix.lower() in AUDIO_EXTENSIONS}
        files, seconds = union_of_shards(store_root, EXTRACT_SHARD, shard_keys, tmp, "seconds", expected, normalized_url)
        return files, codes_summary(seconds)

    args = {"normalized_url": normalized_url, "codec": codec, "params": params}
    done = EXTRACT.run(store_root, args, compute)
    run = {"extracted": 0, "skipped": 0, **(counts or {})} if not done.reused else {"extracted": 0, "skipped": 0}
    return done.result({**done.summary, **run, "shards": len(shard_keys)})

