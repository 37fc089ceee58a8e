"""Thin Prefect task for semantic-token extraction (Firefly VQ-GAN): normalized audio -> codes.

The task syncs the normalize artifact into a stable local work folder and extracts there:
extraction is incremental by content (a sidecar per ``.npy``), so one changed file of a
hundred is encoded again, not the hundred. It publishes ``<speaker>/<stem>.lab`` +
``<stem>.npy`` per item: exactly what ``pack`` reads.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from prefect import task

from fish_speech_core import storage
from fish_speech_core.storage import Store, local_file
from fishtune.tasks.caching import content_policy

DERIVED = (".npy", ".npy.json")  # made here, kept across syncs


# Also the key of flows.extract.extract_on_pool: one definition of what invalidates an extraction.
EXTRACT_CACHE = content_policy(["normalized_url", "codec"], ignore=["work_dir", "num_workers", "batch_size", "device"])


@task(
    name="extract",
    cache_policy=EXTRACT_CACHE,
    persist_result=True,
)
def extract_task(
    normalized_url: str,
    codec: str,
    store_root: str,
    work_dir: str,
    text_extension: str = ".lab",
    dtype: str = "fp32",
    max_seconds: float = 30.0,
    batch_size: int | None = None,
    num_workers: int = 1,
    device: str = "auto",
) -> dict:
    """Encode every normalized file to ``(8, frames)`` codes; publish transcripts + codes."""
    import torch

    from fish_speech_core.audio import AUDIO_EXTENSIONS
    from fish_speech_core.codec import load_codec
    from fish_speech_core.codec.extract import ExtractSettings, default_batch_size, extract

    store = Store(store_root)
    inputs = {"normalized": storage.hash_tree(normalized_url), "codec": storage.hash_any(codec)}
    params = {"dtype": dtype, "max_seconds": max_seconds, "text_extension": text_extension}
    key = storage.artifact_key("extract", inputs, params, storage.code_version())
    artifact = store.lookup("extract", key)
    if artifact is not None:
        info = json.loads(store.read_bytes(f"extract/{key}/extract-summary.json"))
        return {"stage": "extract", "key": key, "url": artifact.url, "summary": info["counts"] | {"reused_artifact": True}}

    local = Path(work_dir)
    storage.sync_tree(normalized_url, local, keep_suffixes=DERIVED)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_codec(local_file(codec, local.parent / "checkpoints"), device=device)
    audio = sorted(p for p in local.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(local).parts))
    summary = extract(model, audio, ExtractSettings(batch_size=batch_size or default_batch_size(device),
                                                    num_workers=num_workers,
                                                    max_seconds=max_seconds, dtype=dtype))
    bad = [r for r in summary.results if r.status in ("failed", "rejected")]
    if bad:
        listed = "; ".join(f"{r.audio_path.relative_to(local)}: {r.reason}" for r in bad[:5])
        raise RuntimeError(f"extract could not encode {len(bad)} file(s): {listed}")
    counts = {status: summary.count(status) for status in ("extracted", "skipped")}
    counts["audio_seconds"] = round(sum(r.seconds for r in summary.results), 3)
    files: dict[str, Path] = {}
    for path in audio:
        rel = path.relative_to(local).with_suffix("")
        files[f"{rel.as_posix()}.npy"] = path.with_suffix(".npy")
        files[f"{rel.as_posix()}{text_extension}"] = path.with_suffix(text_extension)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "extract-summary.json"
        report.write_text(json.dumps({"counts": counts, "device": device, "wall_seconds": summary.wall_seconds}, indent=2))
        files["extract-summary.json"] = report
        artifact = store.publish("extract", key, files, metadata={"inputs": inputs, "params": params})
    return {"stage": "extract", "key": key, "url": artifact.url, "summary": counts}
