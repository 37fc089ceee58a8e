"""The CPU stages that can run as child runs on the ``cpu`` pool: validate and normalize, on shards.

With ``cpu_pool`` and K > 1 (``data_shards``, or by default one shard per
``DATA_ITEMS_PER_SHARD`` clips: found ones for validate, accepted ones for normalize) the finetune
flow runs one ``validate-shard`` / ``normalize-shard`` child per shard at once
(:func:`fishtune.flows.shards.run_on_shards`) and merges their artifacts into the ``validate`` /
``normalize`` artifact one in-process run publishes. No concurrency limit: a cpu worker's
``--limit`` decides how many shards one host takes. The children read the data folder the parent
fetched; a normalize child resolves its own work folder.
"""

from __future__ import annotations

from prefect import Task, flow

from fish_speech_core.storage import Store
from fishtune.flows.shards import Sharded
from fishtune.tasks.data import (NORMALIZE, NORMALIZE_SHARD, VALIDATE, VALIDATE_SHARD, data_shard_files,
                                 merge_normalize_shards, merge_validate_shards, normalize_shard_task,
                                 validate_shard_task)
from fishtune.tasks.params import NormalizeParams, ValidateParams
from fishtune.tasks.remote import on_pool, publish_child_result
from fishtune.tasks.runtime import bind, work_folder


@flow(name="validate-shard", persist_result=True)
def validate_shard_flow(data_dir: str, store_root: str, shard: int, shards: int,
                        params: ValidateParams = ValidateParams()) -> dict:
    """Validate one shard of a dataset; publish its manifest rows."""
    bound = bind(validate_shard_task, Store(store_root), work_folder(store_root, None))
    return publish_child_result(store_root, bound(data_dir=data_dir, store_root=store_root, shard=shard, shards=shards,
                                                  params=params))


@flow(name="normalize-shard", persist_result=True)
def normalize_shard_flow(data_dir: str, store_root: str, shard: int, shards: int,
                         params: NormalizeParams = NormalizeParams(), work_dir: str | None = None) -> dict:
    """Loudness-normalize one shard of a dataset; publish its audio + transcripts."""
    bound = bind(normalize_shard_task, Store(store_root), work_folder(store_root, work_dir))
    return publish_child_result(store_root, bound(data_dir=data_dir, store_root=store_root, shard=shard, shards=shards,
                                                  params=params, work_dir=work_dir))


# the CPU stages' deployments (flow name / deployment name in deployments/prefect.yaml) and launchers
DEPLOYMENTS = {name: f"{name}/{name}" for name in ("validate-shard", "normalize-shard")}


def _pool_sizing(params) -> dict:
    return {}  # no GPU, no memory request: the pool's own job defaults


LAUNCHERS: dict[str, Task] = {
    "validate-shard": on_pool(validate_shard_task, VALIDATE_SHARD, DEPLOYMENTS["validate-shard"], sizing=_pool_sizing),
    "normalize-shard": on_pool(normalize_shard_task, NORMALIZE_SHARD, DEPLOYMENTS["normalize-shard"], sizing=_pool_sizing),
}


def _shard_files(args, shard: int, shards: int) -> dict[str, str]:
    return data_shard_files(args["data_dir"], shard, shards)


VALIDATE_SHARDS = Sharded(VALIDATE, LAUNCHERS["validate-shard"], merge_validate_shards, _shard_files,
                          counts=("checked", "reused"))
NORMALIZE_SHARDS = Sharded(NORMALIZE, LAUNCHERS["normalize-shard"], merge_normalize_shards, _shard_files,
                           counts=("written", "skipped"))
