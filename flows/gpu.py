"""The GPU stages as flows of their own, so deployments can put them on the ``cuda`` pool.

Tasks cannot be sent to a work pool; flow runs of deployments can. The finetune flow runs each
stage task in-process by default, or, with ``gpu_pool`` set, the stage's flow here as a child
run through :func:`fishtune.tasks.remote.on_pool` (same cache key: a rerun launches nothing).
Every child takes one slot of the global ``gpu`` concurrency limit (``fishtune deploy`` makes it,
one slot per GPU), so no two GPU steps share a card whatever a worker's ``--limit``. The child
resolves its own work folder on its own host (``work_dir`` empty).

Extraction can be sharded (:data:`EXTRACT_SHARDS`, run by :func:`fishtune.flows.shards.run_on_shards`):
one ``extract-shard`` child per shard at once (each its own cached unit), their artifacts merged
into the one ``extract`` artifact.
"""

from __future__ import annotations

from prefect import Task, flow
from prefect.concurrency.sync import concurrency

from fish_speech_core.storage import Store
from fishtune.flows.shards import Sharded
from fishtune.tasks.codec import EXTRACT, EXTRACT_SHARD, extract_shard_task, extract_task, merge_shards, shard_items
from fishtune.tasks.evaluate import EVALUATE, evaluate_task
from fishtune.tasks.merge import MERGE, merge_task
from fishtune.tasks.params import EvaluateParams, ExtractParams, MergeParams, TrainParams
from fishtune.tasks.remote import GPU_LIMIT, on_pool, publish_child_result
from fishtune.tasks.runtime import bind, work_folder
from fishtune.tasks.train import TRAIN, train_node_task, train_task

# The GPU stages: their tasks, and the deployments (flow name / deployment name in
# deployments/prefect.yaml) that run them as child runs
STAGES = {"extract": (EXTRACT, extract_task), "extract-shard": (EXTRACT_SHARD, extract_shard_task),
          "train": (TRAIN, train_task), "evaluate": (EVALUATE, evaluate_task), "merge": (MERGE, merge_task)}
DEPLOYMENTS = {name: f"{name}/{name}" for name in STAGES}


def _on_gpu(stage_task: Task, store_root: str, work_dir: str | None, gpus: int = 1, **arguments) -> dict:
    bound = bind(stage_task, Store(store_root), work_folder(store_root, work_dir))
    # the limit lives on the server; strict=False: without it (an ad-hoc run) nothing is limited
    with concurrency(GPU_LIMIT, occupy=gpus, strict=False):
        return publish_child_result(store_root, bound(store_root=store_root, work_dir=work_dir, **arguments))


@flow(name="extract", persist_result=True)
def extract_flow(normalized_url: str, codec: str, store_root: str, params: ExtractParams = ExtractParams(),
                 workspace: str = "default", work_dir: str | None = None) -> dict:
    """Extract Firefly semantic tokens for a normalize artifact; publish transcripts + codes."""
    return _on_gpu(extract_task, store_root, work_dir, normalized_url=normalized_url, codec=codec, params=params,
                   workspace=workspace)


@flow(name="extract-shard", persist_result=True)
def extract_shard_flow(normalized_url: str, codec: str, store_root: str, shard: int, shards: int,
                       params: ExtractParams = ExtractParams(), workspace: str = "default",
                       work_dir: str | None = None) -> dict:
    """Extract Firefly semantic tokens for one shard of a normalize artifact; publish its transcripts + codes."""
    return _on_gpu(extract_shard_task, store_root, work_dir, normalized_url=normalized_url, codec=codec, shard=shard,
                   shards=shards, params=params, workspace=workspace)


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
        return publish_child_result(store_root, train_node_task(
            pack_url=pack_url, base=base, store_root=store_root, params=params, node_rank=node_rank,
            init_lora=init_lora, work_dir=work_dir))


def train_job_variables(params: TrainParams, node_rank: int = 0) -> dict:
    """Job variables of train child run ``node_rank`` beyond the pool's sizing (``gpu_count``,
    ``memory``: :func:`fishtune.tasks.remote.job_variables_for`): with several nodes, the rendezvous
    the core reads (``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``) as env."""
    from fish_speech_core.finetune.distributed import Rendezvous

    if params.num_nodes <= 1:
        return {}
    per_node = params.processes_per_node() or 1  # TrainParams makes sure devices is a count or a list then
    return {"env": Rendezvous(node_rank=node_rank, master_addr=params.master_addr or "", master_port=params.master_port,
                              world_size=per_node * params.num_nodes).env()}


def train_launches(parameters: dict) -> list[tuple[dict, dict]]:
    """One train child run per node: (parameter overrides, job variables). A child sees only its
    own GPUs (a container's, or its process worker's CUDA_VISIBLE_DEVICES), so an explicit list
    becomes a count (run-only: the stage key does not change)."""
    params = TrainParams.model_validate(parameters["params"])
    per_node = params.processes_per_node()
    if per_node is None:  # devices auto on one node: the pool's defaults
        return [({}, None)]
    child = params.model_copy(update={"devices": str(per_node)}).model_dump(mode="json")
    return [({"params": child, "node_rank": rank}, train_job_variables(params, rank))
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


# extraction on K shards (flows.shards.run_on_shards): one extract-shard child per shard, merged here
EXTRACT_SHARDS = Sharded(EXTRACT, LAUNCHERS["extract-shard"], merge_shards,
                         lambda args, shard, shards: shard_items(args["normalized_url"], shard, shards,
                                                                 args["params"].text_extension),
                         counts=("extracted", "skipped"))
