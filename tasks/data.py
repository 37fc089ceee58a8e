"""Thin Prefect tasks for the data stages: fetch, validate, normalize.

Each returns a small dict (artifact URL, key, content hash, summary): the bytes stay in the
store. The cache policy is set per run by :func:`tasks.runtime.bind` (it needs the lock folder
and the result storage of that run's store).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from prefect import task

from fish_speech_core import storage
from fish_speech_core.storage import Store
from fishtune.tasks.caching import content_policy

MAX_LISTED_REJECTS = 50  # the report lists this many rejected files; the manifest has them all


@task(name="fetch-data", retries=3, retry_delay_seconds=[2, 10, 30])
def fetch_data(data: str, work_dir: str, speakers: list[str] | None = None) -> str:
    """A local folder with the dataset: ``data`` itself when local, else a synced mirror (I/O only)."""
    if storage.is_local(data) and not speakers:
        return str(storage.local_path(data))
    mirror = Path(work_dir) / "data" / storage.digest_listing({"data": storage.normalize_url(data), "speakers": ",".join(sorted(speakers or []))})[:16]
    storage.sync_tree(data, mirror, only=speakers)
    return str(mirror)


def _small_validation_summary(summary: dict) -> dict:
    keep = ("accepted", "rejected", "total_hours", "speakers", "rejects_by_reason", "advice")
    small = {k: summary[k] for k in keep}
    small["rejects"] = summary["rejects"][:MAX_LISTED_REJECTS]
    return small


@task(name="validate", cache_policy=content_policy(["data_dir"], ignore=["num_workers"]), persist_result=True)
def validate_task(data_dir: str, store_root: str, max_seconds: float = 30.0, text_extension: str = ".lab", num_workers: int = 1) -> dict:
    """Validate the dataset; publish ``manifest.parquet`` + ``summary.json`` + ``report.md``."""
    from fish_speech_core.validate import ValidationSettings, validate

    store = Store(store_root)
    data_sha = storage.hash_tree(data_dir)
    params = {"max_seconds": max_seconds, "text_extension": text_extension}
    key = storage.artifact_key("validate", {"data": data_sha}, params, storage.code_version())
    artifact = store.lookup("validate", key)
    if artifact is None:
        report = validate(data_dir, None, ValidationSettings(text_extension, max_seconds), num_workers, show_progress=False)
        summary = report.summary()
        with tempfile.TemporaryDirectory() as tmp:
            report.write_parquet(Path(tmp) / "manifest.parquet")
            (Path(tmp) / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
            (Path(tmp) / "report.md").write_text(report.to_markdown())
            artifact = store.publish("validate", key, tmp, metadata={"data_sha256": data_sha, "params": params})
    else:
        summary = json.loads(store.read_bytes(f"validate/{key}/summary.json"))
    return {
        "stage": "validate",
        "key": key,
        "url": artifact.url,
        "data_sha256": data_sha,
        "manifest": artifact.file_url("manifest.parquet"),
        "summary": _small_validation_summary(summary),
    }


@task(name="normalize", cache_policy=content_policy(["data_dir"], ignore=["num_workers", "work_dir"]), persist_result=True)
def normalize_task(
    data_dir: str,
    store_root: str,
    work_dir: str,
    peak: float = -1.0,
    loudness: float = -23.0,
    format: str = "keep",
    max_seconds: float = 30.0,
    text_extension: str = ".lab",
    num_workers: int = 1,
) -> dict:
    """Loudness-normalize into a per-dataset work folder (per-file incremental), publish the result."""
    from fish_speech_core.normalize import NormalizeSettings, normalize_tree
    from fish_speech_core.validate import ValidationSettings

    store = Store(store_root)
    data_sha = storage.hash_tree(data_dir)
    settings = NormalizeSettings(peak=peak, loudness=loudness, format=format)
    params = {"peak": peak, "loudness": loudness, "format": format, "max_seconds": max_seconds, "text_extension": text_extension}
    key = storage.artifact_key("normalize", {"data": data_sha}, params, storage.code_version())
    artifact = store.lookup("normalize", key)
    if artifact is not None:
        return {"stage": "normalize", "key": key, "url": artifact.url, "data_sha256": data_sha,
                "summary": {"files": len(artifact.files) - 1, "written": 0, "skipped": 0, "reused_artifact": True}}

    # The work folder is keyed by *where* the data is and the settings, not by its content: the
    # next run over the same dataset finds last run's outputs there and redoes only changed files.
    place = storage.digest_listing({"data": str(Path(data_dir).absolute()), "params": storage.canonical_json(params)})[:16]
    out = Path(work_dir) / "normalize" / place
    report = normalize_tree(
        data_dir, out, settings, ValidationSettings(text_extension, max_seconds), None, num_workers, show_progress=False
    )
    failed = [r for r in report.results if r.status == "failed"]
    if failed:
        listed = "; ".join(f"{r.rel_path}: {r.detail}" for r in failed[:5])
        raise RuntimeError(f"normalize failed for {len(failed)} file(s): {listed}")
    files: dict[str, Path] = {}
    for result in report.results:  # only this run's accepted items: stale outputs are not published
        audio = Path(result.output)
        rel = audio.relative_to(out).as_posix()
        files[rel] = audio
        files[str(Path(rel).with_suffix(text_extension))] = audio.with_suffix(text_extension)
    summary = report.summary()
    small = {k: summary[k] for k in ("written", "skipped", "audio_seconds_written", "wall_seconds")}
    small["files"] = len(report.results)
    small["clipped"] = len(summary["clipped"])
    with tempfile.TemporaryDirectory() as tmp:
        files["normalize-report.json"] = Path(tmp) / "normalize-report.json"
        files["normalize-report.json"].write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        artifact = store.publish("normalize", key, files, metadata={"data_sha256": data_sha, "params": params})
    return {"stage": "normalize", "key": key, "url": artifact.url, "data_sha256": data_sha, "summary": small}


@task(name="pack", cache_policy=content_policy(["codes_dir"], ignore=["num_workers"]), persist_result=True)
def pack_task(codes_dir: str, store_root: str, text_extension: str = ".lab", shard_size_mb: float = 10.0, num_workers: int = 1) -> dict:
    """Pack transcripts + semantic codes (speaker folders of ``.lab`` + ``.npy``) into shards; publish them."""
    from fish_speech_core.pack import pack

    store = Store(store_root)
    codes_sha = storage.hash_tree(codes_dir)
    params = {"text_extension": text_extension, "shard_size_mb": shard_size_mb}
    key = storage.artifact_key("pack", {"codes": codes_sha}, params, storage.code_version())
    artifact = store.lookup("pack", key)
    if artifact is None:
        with tempfile.TemporaryDirectory() as tmp:
            source = codes_dir
            if not storage.is_local(codes_dir):  # pack reads local folders
                source = str(Path(tmp) / "codes")
                storage.sync_tree(codes_dir, source)
            summary = pack([source], Path(tmp) / "shards", text_extension=text_extension,
                           num_workers=num_workers, shard_size_mb=shard_size_mb)
            if not summary.shards:
                raise ValueError(f"nothing could be packed from {codes_dir}: {summary.rejects[:3]}")
            info = {"speakers": summary.speakers, "sentences": summary.sentences, "frames": summary.frames,
                    "bytes": summary.bytes_written, "rejects": [{"item": r.item, "reason": r.reason} for r in summary.rejects]}
            (Path(tmp) / "shards" / "pack-summary.json").write_text(json.dumps(info, indent=2))
            artifact = store.publish("pack", key, Path(tmp) / "shards", metadata={"codes_sha256": codes_sha, "params": params})
    else:
        info = json.loads(store.read_bytes(f"pack/{key}/pack-summary.json"))
    shards = sorted(rel for rel in artifact.files if rel.endswith(".protos"))
    small = {k: info[k] for k in ("speakers", "sentences", "frames", "bytes")} | {"rejects": len(info["rejects"])}
    return {"stage": "pack", "key": key, "url": artifact.url, "codes_sha256": codes_sha,
            "shards": [artifact.file_url(rel) for rel in shards], "summary": small}
