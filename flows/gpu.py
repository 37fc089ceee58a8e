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
from fishtune.tasks.train import TRAIN, train_node_task, train_task

# The GPU stages: their tasks, and the deployments (flow name / deployment name in
# deployments/prefect.yaml) that run them as child runs
STAGES = {"extract": (EXTRACT, extract_task), "train": (TRAIN, train_task), "evaluate": (EVALUATE, evaluate_task),
          "merge": (MERGE, merge_task)}
DEPLOYMENTS = {name: f"{name}/{name}" for name in STAGES}


def _on_gpu(stage_task: Task, store_root: str, work_dir: str | None, gpus: int = 1, **arguments) -> dict:
    bound = bind(stage_task, Store(store_root), work_folder(store_root, work_dir))
    # the limit lives on the server; strict=False: without it (an ad-hoc run) nothing is limited
    with concurrency(GPU_LIMIT, occupy=gpus, strict=False):
        return bound(store_root=store_root, work_dir=work_dir, **arguments)


@flow(name="extract", persist_result=True)
def extract_flow(normalized_url: str, codec: str, store_root: str, params: ExtractParams = ExtractParams(),
                 workspace: str = "default", work_dir: str | None = None) -> dict:
    """Extract Firefly semantic tokens for a normalize artifact; publish transcripts + codes."""
    return _on_gpu(extract_task, store_root, work_dir, normalized_url=normalized_url, codec=codec, params=params,
                   workspace=workspace)


@flow(name="train", persist_result=True)
def train_flow(pack_url: str, base: str, store_root: str, params: TrainParams = TrainParams(),
               init_lora: str | None = None, work_dir: str | None = None, node_rank: int = 0) -> dict:
    """LoRA-train ``base`` on a pack artifact (resuming its run folder); publish checkpoints and history.

    With ``params.num_nodes`` > 1 every node is one run of this flow (:func:`train_launches`);
    node 0 publishes, the others only train."""
    gpus = params.processes_per_node() or 1
    if node_rank == 0:
        return _on_gpu(train_task, store_root, work_dir, gpus=gpus, pack_url=pack_url, base=base, params=params,
                       init_lora=init_lora)
    with concurrency(GPU_LIMIT, occupy=gpus, strict=False):
        return train_node_task(pack_url=pack_url, base=base, store_root=store_root, params=params,
                               node_rank=node_rank, init_lora=init_lora, work_dir=work_dir)


def train_job_variables(params: TrainParams, node_rank: int = 0, gpu_variable: str | None = None) -> dict:
    """Job variables of train child run ``node_rank`` for ``params.devices`` x ``params.num_nodes``.

    ``env``: ``CUDA_VISIBLE_DEVICES`` for an explicit device count or list (the deployment pins
    one GPU), and with several nodes the rendezvous the core reads (``NODE_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``, ``WORLD_SIZE``). ``gpu_variable``: the name of the pool template's GPU-count
    variable, set to the processes per node (left out when None, or for ``devices`` auto).
    """
    from fish_speech_core.finetune.distributed import Rendezvous

    per_node = params.processes_per_node()
    env: dict[str, str] = {}
    if per_node is not None:
        env["CUDA_VISIBLE_DEVICES"] = params.devices if "," in params.devices else ",".join(map(str, range(per_node)))
    if params.num_nodes > 1:  # TrainParams makes sure devices is a count or a list then
        env |= Rendezvous(node_rank=node_rank, master_addr=params.master_addr or "", master_port=params.master_port,
                          world_size=per_node * params.num_nodes).env()
    variables: dict = {"env": env} if env else {}
    if gpu_variable and per_node is not None:
        variables[gpu_variable] = per_node
    return variables


def train_launches(parameters: dict, gpu_variable: str | None = None) -> list[tuple[dict, dict]]:
    """One train child run per node: (parameter overrides, job variables). The children see only
    their own GPUs (``CUDA_VISIBLE_DEVICES``), so an explicit list becomes a count (run-only: the
    stage key does not change)."""
    params = TrainParams.model_validate(parameters["params"])
    per_node = params.processes_per_node()
    if per_node is None:  # devices auto on one node: the pool's defaults
        return [({}, None)]
    child = params.model_copy(update={"devices": str(per_node)}).model_dump(mode="json")
    return [({"params": child, "node_rank": rank}, train_job_variables(params, rank, gpu_variable))
            for rank in range(params.num_nodes)]


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
LAUNCHES = {"train": train_launches}  # stages whose child runs need more than the pool's defaults
LAUNCHERS: dict[str, Task] = {name: on_pool(stage_task, stage, DEPLOYMENTS[name], LAUNCHES.get(name))
                              for name, (stage, stage_task) in STAGES.items()}
