"""``extract_flow``: the GPU step as its own flow, so a deployment can put it on the ``cuda`` pool.

Tasks cannot be sent to a work pool; flow runs of deployments can. The finetune flow calls this
in-process by default, or, with ``gpu_pool`` set, as a child deployment through a cached task.
"""

from __future__ import annotations

from prefect import flow, task

from fish_speech_core.storage import Store
from fishtune.tasks.codec import EXTRACT_CACHE, extract_task
from fishtune.tasks.remote import run_child
from fishtune.tasks.runtime import bind

DEPLOYMENT = "extract/extract"  # flow name / deployment name in deployments/prefect.yaml


@flow(name="extract", persist_result=True)
def extract_flow(
    normalized_url: str,
    codec: str,
    store_root: str,
    work_dir: str,
    text_extension: str = ".lab",
    dtype: str = "fp32",
    max_seconds: float = 30.0,
    batch_size: int | None = None,  # None: 1 on CPU, 16 on CUDA (default_batch_size)
    num_workers: int = 1,
) -> dict:
    """Extract Firefly semantic tokens for a normalize artifact; publish transcripts + codes."""
    from pathlib import Path

    task_ = bind(extract_task, Store(store_root), Path(work_dir).parent)
    return task_(normalized_url, codec, store_root, work_dir, text_extension, dtype, max_seconds, batch_size, num_workers)


@task(
    name="extract-on-pool",
    cache_policy=EXTRACT_CACHE,
    persist_result=True,
)
def extract_on_pool(
    normalized_url: str,
    codec: str,
    store_root: str,
    work_dir: str,
    text_extension: str = ".lab",
    dtype: str = "fp32",
    max_seconds: float = 30.0,
    batch_size: int | None = None,  # None: 1 on CPU, 16 on CUDA (default_batch_size)
    num_workers: int = 1,
) -> dict:
    """Run :func:`extract_flow` as a child deployment (GPU pool); a cache hit launches nothing."""
    return run_child(DEPLOYMENT, {
        "normalized_url": normalized_url, "codec": codec, "store_root": store_root, "work_dir": work_dir,
        "text_extension": text_extension, "dtype": dtype, "max_seconds": max_seconds,
        "batch_size": batch_size, "num_workers": num_workers,
    })
