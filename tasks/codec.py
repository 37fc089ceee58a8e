"""Thin Prefect task for semantic-token extraction (Firefly VQ-GAN): normalized audio -> codes.

The task syncs the normalize artifact into a stable local work folder and extracts there:
extraction is incremental by content (a sidecar per ``.npy``), so one changed file of a
hundred is encoded again, not the hundred. It publishes ``<speaker>/<stem>.lab`` +
``<stem>.npy`` (+ the ``.npy.json`` sidecar naming the codec's code spec) per item: exactly
what ``pack`` reads.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from fish_speech_core.storage import local_file, redact, sync_tree
from fishtune.tasks.params import ExtractParams
from fishtune.tasks.runtime import work_folder
from fishtune.tasks.stage import Stage

DERIVED = (".npy", ".npy.json")  # made here, kept across syncs
EXTRACT = Stage("extract", {"normalized": "normalized_url", "codec": "codec"}, summary_file="extract-summary.json")


@task(name="extract", cache_policy=EXTRACT.cache_policy, persist_result=True)
def extract_task(normalized_url: str, codec: str, store_root: str, params: ExtractParams = ExtractParams(),
                 workspace: str = "default", work_dir: str | None = None) -> dict:
    """Encode every normalized file to ``(8, frames)`` codes; publish transcripts + codes.

    ``workspace`` names the incremental folder ``<work>/extract/<workspace>/`` on the host that
    runs this (the flow names it after the dataset, so the next run over it redoes changed files only).
    """

    def compute(tmp: Path):
        import torch

        from fish_speech_core.audio import AUDIO_EXTENSIONS
        from fish_speech_core.codec import load_codec
        from fish_speech_core.codec.extract import ExtractSettings, batching_for, extract
        from fish_speech_core.codes import SIDECAR_SUFFIX, sidecar_path_for

        local = work_folder(store_root, work_dir) / "extract" / workspace
        sync_tree(normalized_url, local, keep_suffixes=DERIVED)
        device = params.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_codec(local_file(codec, local.parent / "checkpoints"), device=device)
        audio = sorted(p for p in local.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(local).parts))
        batch_size, max_batch_seconds = batching_for(device, params.batch_size)
        summary = extract(model, audio, ExtractSettings(batch_size=batch_size, max_batch_seconds=max_batch_seconds,
                                                        num_workers=params.num_workers,
                                                        max_seconds=params.max_seconds, dtype=params.dtype.value))
        bad = [r for r in summary.results if r.status in ("failed", "rejected")]
        if bad:
            listed = "; ".join(f"{r.audio_path.relative_to(local)}: {r.reason}" for r in bad[:5])
            raise RuntimeError(f"extract could not encode {len(bad)} file(s) of {redact(normalized_url)}: {listed}")
        counts = {status: summary.count(status) for status in ("extracted", "skipped")}
        counts["audio_seconds"] = round(sum(r.seconds for r in summary.results), 3)
        files: dict[str, Path] = {}
        for path in audio:
            rel = path.relative_to(local).with_suffix("").as_posix()
            files[f"{rel}.npy"] = path.with_suffix(".npy")
            files[f"{rel}{params.text_extension}"] = path.with_suffix(params.text_extension)
            sidecar = sidecar_path_for(path.with_suffix(".npy"))
            if sidecar.is_file():  # the codec's code spec: pack checks every .npy against it
                files[f"{rel}.npy{SIDECAR_SUFFIX}"] = sidecar
        return files, {"counts": counts, "device": device, "batch_size": batch_size,
                       "wall_seconds": summary.wall_seconds}

    done = EXTRACT.run(store_root, {"normalized_url": normalized_url, "codec": codec, "params": params}, compute)
    return done.result(done.summary["counts"])
