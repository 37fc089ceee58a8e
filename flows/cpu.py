"""The CPU stages that can run as child runs on the ``cpu`` pool: normalize, on shards.

With ``cpu_pool`` and K > 1 (``normalize_shards``, or by default one shard per
``NORMALIZE_ITEMS_PER_SHARD`` accepted clips) the finetune flow runs one ``normalize-shard``
child per shard at once (:func:`fishtune.flows.shards.run_on_shards`) and merges their artifacts
into the ``normalize`` artifact one in-process run publishes. No concurrency limit: a cpu worker's
``--limit`` decides how many shards one host takes. The child resolves its own work folder.
"""

from __future__ import annotations

from prefect import Task, flow

from fish_speech_core.storage import Store
from fishtune.flows.shards import Sharded
from fishtune.tasks.data import NORMALIZE, NORMALIZE_SHARD, data_shard_files, merge_normalize_shards, normalize_shard_task
from fishtune.tasks.params import NormalizeParams
from fishtune.tasks.remote import on_pool, publish_child_result
from fishtune.tasks.runtime import bind, work_folder


@flow(name="normalize-shard", persist_result=True)
def normalize_shard_flow(data_dir: str, store_root: str, shard: int, shards: int,
                         params: NormalizeParams = NormalizeParams(), work_dir: str | None = None) -> dict:
    """Loudness-normalize one shard of a dataset; publish its audio + transcripts."""
    bound = bind(normalize_shard_task, Store(store_root), work_folder(store_root, work_dir))
    return publish_child_result(store_root, bound(data_dir=data_dir, store_root=store_root, shard=shard, shards=shards,
                                                  params=params, work_dir=work_dir))


# the CPU stages' deployments (flow name / deployment name in deployments/prefect.yaml) and launchers
DEPLOYMENTS = {"normalize-shard": "normalize-shard/normalize-shard"}
LAUNCHERS: dict[str, Task] = {"normalize-shard": on_pool(normalize_shard_task, NORMALIZE_SHARD,
                                                         DEPLOYMENTS["normalize-shard"],
                                                         sizing=lambda params: {})}  # no GPU, the pool's own sizing
NORMALIZE_SHARDS = Sharded(NORMALIZE, LAUNCHERS["normalize-shard"], merge_normalize_shards,
                           lambda args, shard, shards: data_shard_files(args["data_dir"], shard, shards),
                           counts=("written", "skipped"))
