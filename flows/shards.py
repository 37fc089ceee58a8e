"""A stage run as K child runs, one per shard of its items, then merged here (extract on the GPU
pool, normalize on the CPU pool).

Each shard is a child run of the stage's ``<stage>-shard`` deployment, cached by that shard's
content (so a rerun after a failed shard launches it alone); the merge, in this process, publishes
the union under the stage's own key: the bytes one unsharded run publishes, so a run with another
K (1 included) finds it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.states import State

from fish_speech_core.storage import Store
from fishtune.tasks.runtime import bind
from fishtune.tasks.stage import Stage


@dataclass(frozen=True)
class Sharded:
    """How one stage shards.

    ``stage``: the whole stage (the merge publishes under its key). ``launcher``: the task that runs
    one shard as a child run (:func:`fishtune.tasks.remote.on_pool` of the shard flow; it takes the
    stage's arguments plus ``shard`` and ``shards``). ``merge``: the task that publishes the union
    (the stage's arguments plus ``shard_keys`` and ``counts``). ``files(arguments, shard, shards)``:
    the shard's files (none: no child run). ``counts``: the per-file counts of a shard's result
    (redone, reused), summed for the report.
    """

    stage: Stage
    launcher: Task
    merge: Task
    files: Callable[[Mapping[str, Any], int, int], Mapping[str, str]]
    counts: tuple[str, str]


class ShardsFailed(RuntimeError):
    """Some shards of a stage failed; the finished ones are cached for the rerun."""


def run_on_shards(sharded: Sharded, store: Store, work_dir: Path, shards: int, run_name: str, run_tags: list[str],
                  **arguments: Any) -> State:
    """Run the stage on one child run per non-empty shard of ``shards``, all at once, then merge
    their artifacts. Returns the merge task's state. Called from a flow (the shards are submitted
    to its task runner).

    The merge has the one-run launcher's key: a K=2 run after a K=1 run (or the reverse) finds
    the published artifact and launches nothing. The shard launchers are top-level tasks, not
    nested in another task: a nested task's cache record is committed only with its parent's, and
    a failed parent would drop the finished shards' records.

    Raises:
        ShardsFailed: naming every failed shard and why, once all shards have ended.
    """
    merge = bind(sharded.merge, store, work_dir).with_options(task_run_name=f"{run_name}/merge")
    keys: list[str] = []
    redone, reused = sharded.counts
    counts = {redone: 0, reused: 0}
    if store.lookup(sharded.stage.name, sharded.stage.key(arguments)) is None:  # else published before, whatever its K
        launcher = bind(sharded.launcher, store, work_dir)
        futures = {}
        for i in range(shards):
            if not sharded.files(arguments, i, shards):
                continue  # a tiny dataset can leave a shard empty
            label = f"shard-{i + 1}-of-{shards}"
            futures[label] = launcher.with_options(task_run_name=f"{run_name}/{label}").submit(
                **arguments, store_root=store.root, shard=i, shards=shards, run_name=f"{run_name}/{label}",
                run_tags=[*run_tags, f"shard:{label}"])
        for future in futures.values():
            future.wait()  # every shard ends before any failure is raised: the finished ones are recorded
        states = {label: future.state for label, future in futures.items()}
        failed = {label: state.result(raise_on_failure=False) for label, state in states.items() if not state.is_completed()}
        if failed:
            reasons = "; ".join(f"{label}: {error}" for label, error in failed.items())
            raise ShardsFailed(f"{sharded.stage.name}: {len(failed)} of {len(states)} shard(s) failed ({reasons}); the "
                               f"{len(states) - len(failed)} finished shard(s) are kept, a rerun runs only the failed ones")
        for state in states.values():
            result = state.result()
            keys.append(result["key"])
            cached = state.name == "Cached"  # its counts are an earlier run's: all reused now
            counts[redone] += 0 if cached else result["summary"][redone]
            counts[reused] += result["summary"]["files"] if cached else result["summary"][reused]
    takes = inspect.signature(sharded.merge.fn).parameters  # e.g. not extract's workspace (a shard's work folder)
    return merge(**{k: v for k, v in arguments.items() if k in takes}, store_root=store.root, shard_keys=keys,
                 counts=counts, return_state=True)
