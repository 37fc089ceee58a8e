"""``train_flow``: LoRA training as its own flow, so a deployment can put it on the ``cuda`` pool.

The finetune flow runs :func:`tasks.train.train_task` in-process by default, or, with
``gpu_pool`` set, this flow as a child deployment through the cached task ``train_on_pool``.
Either way training resumes from its run folder's newest checkpoint; it is never retried blindly.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from fish_speech_core.storage import Store
from fishtune.tasks.remote import run_child
from fishtune.tasks.runtime import bind
from fishtune.tasks.train import TRAIN_CACHE, train_task

DEPLOYMENT = "train/train"  # flow name / deployment name in deployments/prefect.yaml


@flow(name="train", persist_result=True)
def train_flow(
    pack_url: str,
    base: str,
    store_root: str,
    work_dir: str,
    project: str = "demo",
    preset: str = "small",
    max_steps: int = 1000,
    seed: int = 42,
    init_lora: str | None = None,
    progress_every: int = 10,
    sampling: str = "cover",
    max_length: int | None = None,
) -> dict:
    """LoRA-train ``base`` on a pack artifact; publish checkpoints, history and the recommendation."""
    task_ = bind(train_task, Store(store_root), Path(work_dir))
    return task_(pack_url, base, store_root, work_dir, project, preset, max_steps, seed, init_lora, progress_every,
                 sampling, max_length)


@task(
    name="train-on-pool",
    cache_policy=TRAIN_CACHE,
    persist_result=True,
)
def train_on_pool(
    pack_url: str,
    base: str,
    store_root: str,
    work_dir: str,
    project: str = "demo",
    preset: str = "small",
    max_steps: int = 1000,
    seed: int = 42,
    init_lora: str | None = None,
    progress_every: int = 10,
    sampling: str = "cover",
    max_length: int | None = None,
) -> dict:
    """Run :func:`train_flow` as a child deployment (GPU pool); a cache hit launches nothing."""
    return run_child(DEPLOYMENT, {
        "pack_url": pack_url, "base": base, "store_root": store_root, "work_dir": work_dir, "project": project,
        "preset": preset, "max_steps": max_steps, "seed": seed, "init_lora": init_lora, "progress_every": progress_every,
        "sampling": sampling, "max_length": max_length,
    })
