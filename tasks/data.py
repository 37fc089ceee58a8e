"""Thin Prefect tasks for the data stages: fetch, validate, normalize, pack.

Each resolves its inputs, calls the core and returns a small dict (artifact URL, key, summary):
the bytes stay in the store. Keys and reuse: :mod:`fishtune.tasks.stage`. The lock and the
result storage are set per run by :func:`fishtune.tasks.runtime.bind`.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from fish_speech_core import storage
from fishtune.tasks.params import NormalizeParams, PackParams, ValidateParams
from fishtune.tasks.runtime import work_folder
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


@task(name="validate", cache_policy=VALIDATE.cache_policy, persist_result=True)
def validate_task(data_dir: str, store_root: str, params: ValidateParams = ValidateParams()) -> dict:
    """Validate the dataset; publish ``manifest.parquet`` + ``summary.json`` + ``report.md``."""
    from fish_speech_core.validate import ValidationSettings, validate

    def compute(tmp: Path):
        report = validate(data_dir, None, ValidationSettings(params.text_extension, params.max_seconds),
                          params.num_workers, show_progress=False)
        report.write_parquet(tmp / "manifest.parquet")
        (tmp / "report.md").write_text(report.to_markdown())
        return {"manifest.parquet": tmp / "manifest.parquet", "report.md": tmp / "report.md"}, report.summary()

    done = VALIDATE.run(store_root, {"data_dir": data_dir, "params": params}, compute)
    return done.result(_small_validation_summary(done.summary), data_sha256=done.inputs["data"],
                       manifest=done.artifact.file_url("manifest.parquet"))


@task(name="normalize", cache_policy=NORMALIZE.cache_policy, persist_result=True)
def normalize_task(data_dir: str, store_root: str, params: NormalizeParams = NormalizeParams(),
                   work_dir: str | None = None) -> dict:
    """Loudness-normalize into a per-dataset work folder (per-file incremental), publish the result."""
    from fish_speech_core.normalize import NormalizeSettings, normalize_tree
    from fish_speech_core.validate import ValidationSettings

    def compute(tmp: Path):
        # The work folder is keyed by *where* the data is and the settings, not by its content: the
        # next run over the same dataset finds last run's outputs there and redoes only changed files.
        place = storage.digest_listing({"data": str(Path(data_dir).absolute()),
                                        "params": storage.canonical_json(params.key_fields())})[:16]
        out = work_folder(store_root, work_dir) / "normalize" / place
        settings = NormalizeSettings(peak=params.peak, loudness=params.loudness, format=params.format.value)
        report = normalize_tree(data_dir, out, settings, ValidationSettings(params.text_extension, params.max_seconds),
                                None, params.num_workers, show_progress=False)
        failed = [r for r in report.results if r.status == "failed"]
        if failed:
            listed = "; ".join(f"{r.rel_path}: {r.detail}" for r in failed[:5])
            raise RuntimeError(f"normalize failed for {len(failed)} file(s): {listed}")
        files: dict[str, Path] = {}
        for result in report.results:  # only this run's accepted items: stale outputs are not published
            audio = Path(result.output)
            rel = audio.relative_to(out).as_posix()
            files[rel] = audio
            files[str(Path(rel).with_suffix(params.text_extension))] = audio.with_suffix(params.text_extension)
        full = report.summary()
        files["normalize-report.json"] = tmp / "normalize-report.json"
        files["normalize-report.json"].write_text(json.dumps(full, indent=2, ensure_ascii=False))
        small = {k: full[k] for k in ("written", "skipped", "audio_seconds_written", "wall_seconds")}
        return files, {**small, "files": len(report.results), "clipped": len(full["clipped"])}

    done = NORMALIZE.run(store_root, {"data_dir": data_dir, "params": params}, compute)
    summary = {**done.summary, "written": 0, "skipped": 0} if done.reused else done.summary
    return done.result(summary, data_sha256=done.inputs["data"])


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
