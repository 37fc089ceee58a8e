"""Thin Prefect tasks for the data stages: fetch, validate, normalize, pack.

Each resolves its inputs, calls the core and returns a small dict (artifact URL, key, summary):
the bytes stay in the store. Keys and reuse: :mod:`fishtune.tasks.stage`. The lock and the
result storage are set per run by :func:`fishtune.tasks.runtime.bind`.

Sharded validate and normalize (several CPU workers): :func:`validate_shard_task` /
:func:`normalize_shard_task` do the items of one shard (:mod:`fish_speech_core.sharding`) as a
``validate-shard`` / ``normalize-shard`` artifact keyed by those files' content;
:func:`merge_validate_shards` / :func:`merge_normalize_shards` publish their union under the one
``validate`` / ``normalize`` key, byte for byte what :func:`validate_task` / :func:`normalize_task`
publish (reports and summaries hold only what the content and settings decide).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect import task

from fish_speech_core import storage
from fish_speech_core.sharding import item_name, shard_files
from fishtune.tasks.params import NormalizeParams, PackParams, ValidateParams
from fishtune.tasks.runtime import work_folder
from fishtune.tasks.shards import union_of_shards
from fishtune.tasks.stage import Stage

MAX_LISTED_REJECTS = 50  # the report lists this many rejected files; the manifest has them all

VALIDATE = Stage("validate", {"data": "data_dir"})
NORMALIZE = Stage("normalize", {"data": "data_dir"})
PACK = Stage("pack", {"codes": "codes_dir"}, summary_file="pack-summary.json")


# No Prefect retries: every storage call is retried where it is made (storage.retry_io), and a
# whole-stage retry on top would multiply the attempts.
@task(name="fetch-data")
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


def _validation_settings(params: ValidateParams | NormalizeParams):
    from fish_speech_core.validate import ValidationSettings

    return ValidationSettings(params.text_extension, params.max_seconds)


def _publish_validation(report, tmp: Path) -> tuple[dict[str, Path], dict]:
    """The files and summary of a validate artifact: what its rows and settings decide, no host
    path (the data folder's path stays in the CLI's own report), so a merge of shards writes the
    bytes one run writes."""
    report.write_parquet(tmp / "manifest.parquet", with_root=False)
    (tmp / "report.md").write_text(report.to_markdown())
    return {"manifest.parquet": tmp / "manifest.parquet", "report.md": tmp / "report.md"}, report.summary(with_root=False)


@task(name="validate", cache_policy=VALIDATE.cache_policy, persist_result=True)
def validate_task(data_dir: str, store_root: str, params: ValidateParams = ValidateParams()) -> dict:
    """Validate the dataset; publish ``manifest.parquet`` + ``summary.json`` + ``report.md``."""
    from fish_speech_core.validate import validate

    def compute(tmp: Path):
        return _publish_validation(validate(data_dir, None, _validation_settings(params), params.num_workers,
                                            show_progress=False), tmp)

    done = VALIDATE.run(store_root, {"data_dir": data_dir, "params": params}, compute)
    return done.result(_small_validation_summary(done.summary), data_sha256=done.inputs["data"],
                       manifest=done.artifact.file_url("manifest.parquet"))


def _normalize(data_dir: str, out: Path, params: NormalizeParams) -> tuple[dict[str, Path], dict[str, dict], dict]:
    """Normalize ``data_dir`` into ``out`` (per-file incremental); (files to publish, one entry per
    accepted item by output path, this run's counts)."""
    from fish_speech_core.normalize import NormalizeSettings, normalize_tree

    settings = NormalizeSettings(peak=params.peak, loudness=params.loudness, format=params.format.value)
    report = normalize_tree(data_dir, out, settings, _validation_settings(params), None, params.num_workers,
                            show_progress=False)
    failed = [r for r in report.results if r.status == "failed"]
    if failed:
        listed = "; ".join(f"{r.rel_path}: {r.detail}" for r in failed[:5])
        raise RuntimeError(f"normalize failed for {len(failed)} file(s): {listed}")
    files: dict[str, Path] = {}
    entries: dict[str, dict] = {}
    for result in report.results:  # only this run's accepted items: stale outputs are not published
        audio = Path(result.output)
        rel = audio.relative_to(out).as_posix()
        files[rel] = audio
        files[str(Path(rel).with_suffix(params.text_extension))] = audio.with_suffix(params.text_extension)
        entries[rel] = {"seconds": result.duration, "clipped": result.clipped, "limited": result.limited}
    return files, entries, {"written": report.count("written"), "skipped": report.count("skipped")}


def normalized_report(entries: Mapping[str, Mapping], params: NormalizeParams) -> dict:
    """``normalize-report.json`` of a normalize artifact: decided by its items alone (no paths of
    a host, timings or per-run counts; sums in sorted order), so a merge of shards writes the
    bytes one run writes."""
    return {"settings": {"peak": params.peak, "loudness": params.loudness, "format": params.format.value},
            "files": len(entries), "audio_seconds": round(sum(entries[k]["seconds"] for k in sorted(entries)), 3),
            "clipped": [{"path": k, "limited": entries[k]["limited"]} for k in sorted(entries) if entries[k]["clipped"]]}


def _publish_normalized(files: dict[str, Path], entries: Mapping[str, Mapping], params: NormalizeParams,
                        tmp: Path) -> tuple[dict[str, Path], dict]:
    report = normalized_report(entries, params)
    files["normalize-report.json"] = tmp / "normalize-report.json"
    files["normalize-report.json"].write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return files, {"files": report["files"], "audio_seconds": report["audio_seconds"], "clipped": len(report["clipped"])}


def _work_place(data_dir: str, params: NormalizeParams) -> str:
    # The work folder is keyed by *where* the data is and the settings, not by its content: the
    # next run over the same dataset finds last run's outputs there and redoes only changed files.
    return storage.digest_listing({"data": str(Path(data_dir).absolute()),
                                   "params": storage.canonical_json(params.key_fields())})[:16]


@task(name="normalize", cache_policy=NORMALIZE.cache_policy, persist_result=True)
def normalize_task(data_dir: str, store_root: str, params: NormalizeParams = NormalizeParams(),
                   work_dir: str | None = None) -> dict:
    """Loudness-normalize into a per-dataset work folder (per-file incremental), publish the result."""
    counts = {"written": 0, "skipped": 0}  # this run's work; 0/0 when the artifact is reused

    def compute(tmp: Path):
        out = work_folder(store_root, work_dir) / "normalize" / _work_place(data_dir, params)
        files, entries, done_counts = _normalize(data_dir, out, params)
        counts.update(done_counts)
        return _publish_normalized(files, entries, params, tmp)

    done = NORMALIZE.run(store_root, {"data_dir": data_dir, "params": params}, compute)
    return done.result({**done.summary, **counts}, data_sha256=done.inputs["data"])


def data_shard_files(data_dir: str, shard: int, shards: int) -> dict[str, str]:
    """Relative path -> sha256 of the files of shard ``shard`` (0-based) of ``shards`` of a dataset
    (each audio file with its transcript, by :func:`fish_speech_core.sharding.item_name`)."""
    return shard_files(storage.file_hashes(data_dir), shard, shards)


def data_items(data_dir: str) -> int:
    """How many items (a clip with its transcript, :func:`fish_speech_core.sharding.item_name`)
    the files of ``data_dir`` make: what sizes validate's shards, before any file is checked."""
    return len({item_name(rel) for rel in storage.file_hashes(data_dir)})


def _data_shard_hashes(args: Mapping[str, Any]) -> dict[str, str]:
    # the shard's own files, not the whole dataset: a new clip elsewhere keeps this key
    return {"items": storage.digest_listing(data_shard_files(str(args["data_dir"]), int(args["shard"]), int(args["shards"])))}


NORMALIZE_SHARD = Stage("normalize-shard", {"data": "data_dir"}, hash_inputs=_data_shard_hashes)


@task(name="normalize-shard", cache_policy=NORMALIZE_SHARD.cache_policy, persist_result=True)
def normalize_shard_task(data_dir: str, store_root: str, shard: int, shards: int,
                         params: NormalizeParams = NormalizeParams(), work_dir: str | None = None) -> dict:
    """Normalize the items of shard ``shard`` (0-based) of ``shards``; publish their audio + transcripts.

    Its files are synced from ``data_dir`` (a path or URL this host reads) into
    ``<work>/normalize/<place>-<shard>-of-<shards>/data`` and normalized beside it (per-file
    incremental, as one run). The summary lists every item of the shard (None: not accepted),
    for the merge's checks."""
    counts = {"written": 0, "skipped": 0}
    args = {"data_dir": data_dir, "shard": shard, "shards": shards, "params": params}

    def compute(tmp: Path):
        wanted = data_shard_files(data_dir, shard, shards)
        if not wanted:
            raise ValueError(f"shard {shard + 1} of {shards} of {storage.redact(data_dir)} holds no file")
        place = work_folder(store_root, work_dir) / "normalize" / f"{_work_place(data_dir, params)}-{shard + 1}-of-{shards}"
        storage.sync_tree(data_dir, place / "data", files=wanted)
        files, entries, done_counts = _normalize(str(place / "data"), place / "out", params)
        counts.update(done_counts)
        items: dict[str, dict | None] = {item_name(rel): None for rel in wanted}
        items.update({item_name(rel): {"path": rel, **entry} for rel, entry in entries.items()})
        return files, {"files": len(entries), "items": items}

    done = NORMALIZE_SHARD.run(store_root, args, compute)
    return done.result({"files": done.summary["files"], **counts})


@task(name="normalize-merge", cache_policy=NORMALIZE.launch_policy, persist_result=True)
def merge_normalize_shards(data_dir: str, store_root: str, params: NormalizeParams = NormalizeParams(),
                           shard_keys: Sequence[str] = (), counts: Mapping[str, int] | None = None) -> dict:
    """Publish the union of the ``normalize-shard`` artifacts ``shard_keys`` as the ``normalize``
    artifact of ``data_dir``: the same files and bytes one run publishes, under its key (so a K=1
    run finds it). ``counts``: the shards' files written and reused in this run (result only).

    Raises:
        ValueError: a shard artifact is missing, an item is in two shards, or a data item is in none.
    """
    def compute(tmp: Path):
        expected = {item_name(rel) for rel in storage.file_hashes(data_dir)}
        files, items = union_of_shards(store_root, NORMALIZE_SHARD, shard_keys, tmp, "items", expected, data_dir)
        entries = {item["path"]: item for item in items.values() if item}
        return _publish_normalized(files, {rel: {k: e[k] for k in ("seconds", "clipped", "limited")}
                                           for rel, e in entries.items()}, params, tmp)

    done = NORMALIZE.run(store_root, {"data_dir": data_dir, "params": params}, compute)
    run = {"written": 0, "skipped": 0, **(counts or {})} if not done.reused else {"written": 0, "skipped": 0}
    return done.result({**done.summary, **run, "shards": len(shard_keys)}, data_sha256=done.inputs["data"])


VALIDATE_SHARD = Stage("validate-shard", {"data": "data_dir"}, hash_inputs=_data_shard_hashes)


@task(name="validate-shard", cache_policy=VALIDATE_SHARD.cache_policy, persist_result=True)
def validate_shard_task(data_dir: str, store_root: str, shard: int, shards: int,
                        params: ValidateParams = ValidateParams()) -> dict:
    """Validate the items of shard ``shard`` (0-based) of ``shards`` where they are (``data_dir``:
    a folder this host reads, the one the parent fetched). Its summary holds every item of the
    shard with its manifest rows, for the merge."""
    from dataclasses import asdict

    from fish_speech_core.sharding import shard_of
    from fish_speech_core.validate import validate

    args = {"data_dir": data_dir, "shard": shard, "shards": shards, "params": params}

    def compute(tmp: Path):
        wanted = data_shard_files(data_dir, shard, shards)
        if not wanted:
            raise ValueError(f"shard {shard + 1} of {shards} of {storage.redact(data_dir)} holds no file")
        report = validate(data_dir, None, _validation_settings(params), params.num_workers, show_progress=False,
                          keep=lambda rel: shard_of(item_name(rel), shards) == shard)
        items: dict[str, list[dict]] = {item_name(rel): [] for rel in wanted}
        for record in report.records:
            items.setdefault(item_name(record.path), []).append(asdict(record))
        return {}, {"files": len(report.records), "items": items}

    done = VALIDATE_SHARD.run(store_root, args, compute)
    checked = 0 if done.reused else done.summary["files"]
    return done.result({"files": done.summary["files"], "checked": checked, "reused": done.summary["files"] - checked})


@task(name="validate-merge", cache_policy=VALIDATE.launch_policy, persist_result=True)
def merge_validate_shards(data_dir: str, store_root: str, params: ValidateParams = ValidateParams(),
                          shard_keys: Sequence[str] = (), counts: Mapping[str, int] | None = None) -> dict:
    """Publish the rows of the ``validate-shard`` artifacts ``shard_keys`` as the ``validate``
    artifact of ``data_dir``: the rows in one run's order, its report rebuilt from them by the
    function one run uses, so the same bytes under the same key (a K=1 run finds it).
    ``counts``: the shards' files checked and reused in this run (result only).

    Raises:
        ValueError: a shard artifact is missing, an item is in two shards, or a data item is in none.
    """
    from fish_speech_core.validate import Record, report_of

    def compute(tmp: Path):
        expected = {item_name(rel) for rel in storage.file_hashes(data_dir)}
        _, items = union_of_shards(store_root, VALIDATE_SHARD, shard_keys, tmp, "items", expected, data_dir)
        records = [Record(**row) for rows in items.values() for row in rows]
        return _publish_validation(report_of(data_dir, records, _validation_settings(params)), tmp)

    done = VALIDATE.run(store_root, {"data_dir": data_dir, "params": params}, compute)
    run = {"checked": 0, "reused": 0, **(counts or {})} if not done.reused else {"checked": 0, "reused": 0}
    return done.result({**_small_validation_summary(done.summary), **run, "shards": len(shard_keys)},
                       data_sha256=done.inputs["data"], manifest=done.artifact.file_url("manifest.parquet"))


@task(name="pack", cache_policy=PACK.cache_policy, persist_result=True)
def pack_task(codes_dir: str, store_root: str, params: PackParams = PackParams()) -> dict:
    """Pack transcripts + semantic codes (speaker folders of ``.lab`` + ``.npy``) into shards; publish them."""
    from fish_speech_core.pack import pack

    def compute(tmp: Path):
        source = codes_dir
        if not storage.is_local(codes_dir):  # pack reads local folders
            source = str(tmp / "codes")
            storage.sync_tree(codes_dir, source)
        summary = pack([source], tmp / "shards", text_extension=params.text_extension,
                       num_workers=params.num_workers, shard_size_mb=params.shard_size_mb)
        if not summary.shards:
            raise ValueError(f"nothing could be packed from {storage.redact(codes_dir)}: {summary.rejects[:3]}")
        info = {"speakers": summary.speakers, "sentences": summary.sentences, "frames": summary.frames,
                "bytes": summary.bytes_written, "rejects": [{"item": r.item, "reason": r.reason} for r in summary.rejects]}
        return tmp / "shards", info

    done = PACK.run(store_root, {"codes_dir": codes_dir, "params": params}, compute)
    shards = sorted(rel for rel in done.artifact.files if rel.endswith(".protos"))
    info = done.summary
    small = {k: info[k] for k in ("speakers", "sentences", "frames", "bytes")} | {"rejects": len(info["rejects"])}
    return done.result(small, codes_sha256=done.inputs["codes"], shards=[done.artifact.file_url(rel) for rel in shards])
