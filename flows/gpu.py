"""The GPU stages as flows of their own, so deployments can put them on the ``cuda`` pool.

Tasks cannot be sent to a work pool; flow runs of deployments can. The finetune flow runs each
stage task in-process by default, or, with ``gpu_pool`` set, the stage's flow here as a child
run through :func:`fishtune.tasks.remote.on_pool` (same cache key: a rerun launches nothing).
Every child takes one slot of the global ``gpu`` concurrency limit (``fishtune deploy`` makes it,
one slot per GPU), so no two GPU steps share a card whatever a worker's ``--limit``. The child
resolves its own work folder on its own host (``work_dir`` empty).
"""

from __future__ import annotations

from prefect import Task, flow
from prefect.concurrency.sync import concurrency

from fish_speech_core.storage import Store
from fishtune.tasks.codec import EXTRACT, extract_task
from fishtune.tasks.evaluate import EVALUATE, evaluate_task
from fishtune.tasks.merge import MERGE, merge_task
from fishtune.tasks.params import EvaluateParams, ExtractParams, MergeParams, TrainParams
from fishtune.tasks.remote import GPU_LIMIT, on_pool
from fishtune.tasks.runtime import bind, work_folder
from fishtune.tasks.train import TRAIN, train_task

# The GPU stages: their tasks, and the deployments (flow name / deployment name in
# deployments/prefect.yaml) that run them as child runs
STAGES = {"extract": (EXTRACT, extract_task), "train": (TRAIN, train_task), "evaluate": (EVALUATE, evaluate_task),
          "merge": (MERGE, merge_task)}
DEPLOYMENTS = {name: f"{name}/{name}" for name in STAGES}


def _on_gpu(stage_task: Task, store_root: str, work_dir: str | None, **arguments) -> dict:
    bound = bind(stage_task, Store(store_root), work_folder(store_root, work_dir))
    # the limit lives on the server; strict=False: without it (an ad-hoc run) nothing is limited
    with concurrency(GPU_LIMIT, occupy=1, strict=False):
        return bound(store_root=store_root, work_dir=work_dir, **arguments)


@flow(name="extract", persist_result=True)
def extract_flow(normalized_url: str, codec: str, store_root: str, params: ExtractParams = ExtractParams(),
                 workspace: str = "default", work_dir: str | None = None) -> dict:
    """Extract Firefly semantic tokens for a normalize artifact; publish transcripts + codes."""
    return _on_gpu(extract_task, store_root, work_dir, normalized_url=normalized_url, codec=codec, params=params,
                   workspace=workspace)


@flow(name="train", persist_result=True)
def train_flow(pack_url: str, base: str, store_root: str, params: TrainParams = TrainParams(),
               init_lora: str | None = None, work_dir: str | None = None) -> dict:
    """LoRA-train ``base`` on a pack artifact (resuming its run folder); publish checkpoints and history."""
    return _on_gpu(train_task, store_root, work_dir, pack_url=pack_url, base=base, params=params, init_lora=init_lora)


@flow(name="evaluate", persist_result=True)
def evaluate_flow(train_url: str, base: str, codec: str, normalized_url: str, store_root: str,
                  pack_url: str | None = None, params: EvaluateParams = EvaluateParams(),
                  work_dir: str | None = None) -> dict:
    """Render and score previews of the base and every kept checkpoint; publish them with the pick."""
    return _on_gpu(evaluate_task, store_root, work_dir, train_url=train_url, base=base, codec=codec,
                   normalized_url=normalized_url, pack_url=pack_url, params=params)


@flow(name="merge", persist_result=True)
def merge_flow(checkpoint: str, base: str, store_root: str, params: MergeParams = MergeParams(),
               work_dir: str | None = None) -> dict:
    """Merge the adapter into the base, verify it, publish a new model version."""
    return _on_gpu(merge_task, store_root, work_dir, checkpoint=checkpoint, base=base, params=params)


LOCAL: dict[str, Task] = {name: stage_task for name, (_, stage_task) in STAGES.items()}
LAUNCHERS: dict[str, Task] = {name: on_pool(stage_task, stage, DEPLOYMENTS[name])
                              for name, (stage, stage_task) in STAGES.items()}
