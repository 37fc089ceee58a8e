"""Thin Prefect task for LoRA training: packed shards + base -> checkpoints, history, recommendation.

``train`` is never retried blindly: it trains in a content-addressed run folder
(``<work>/train/<key>/``), so a rerun after a failure resumes from that folder's newest
checkpoint (step counter, optimizer and history continue). It reports progress to the Prefect
UI (a progress artifact and a log line with loss and tokens/s every ``progress_every`` steps)
and publishes checkpoints + history to ``<root>/train/<key>/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE

from fish_speech_core import storage
from fish_speech_core.storage import local_file, local_tree
from fishtune.tasks.params import TrainParams
from fishtune.tasks.runtime import work_folder
from fishtune.tasks.stage import Stage, artifact_key, run_logger

if TYPE_CHECKING:
    from fish_speech_core.finetune.module import TrainConfig

TRAIN = Stage("train", {"pack": "pack_url", "base": "base", "init_lora": "init_lora"})


class ProgressReport:
    """The training progress hook: Prefect's progress artifact and a run-log line per call."""

    def __init__(self, project: str, max_steps: int):
        from prefect.artifacts import create_progress_artifact

        self.logger = run_logger("fishtune.train")
        self.artifact = create_progress_artifact(
            0.0, key=artifact_key("fishtune", project, "train-progress"), description=f"LoRA training, {max_steps} steps")

    def __call__(self, info: dict) -> None:
        from prefect.artifacts import update_progress_artifact

        step, total = info["step"], info["max_steps"]
        if self.artifact is not None:
            update_progress_artifact(self.artifact, progress=100.0 * step / total)
        eta = f", ETA {info['eta_s']:.0f} s" if info.get("eta_s") is not None else ""
        self.logger.info("step %d/%d: loss %.4f, %.0f tokens/s%s", step, total, info["loss"], info["tokens_per_s"], eta)


def train_config(params: TrainParams, key: str, work: Path, pack_url: str, base: str, init_lora: str | None,
                 logger) -> TrainConfig:
    """The core's run config of this stage on this host: inputs fetched into ``work``, the run
    folder ``<work>/train/<key[:16]>`` (a rerun resumes it), the preset's settings."""
    from fish_speech_core.finetune.limits import base_max_seq_len, resolve_max_length
    from fish_speech_core.finetune.module import TrainConfig
    from fish_speech_core.finetune.presets import preset_settings

    settings = preset_settings(params.preset.value)
    shards = local_tree(pack_url, work / "inputs")
    base_dir = local_tree(base, work / "inputs")
    # the preset's length is a default: capped at what the base attends to; a set one must fit
    resolved = resolve_max_length(params.max_length, base_max_seq_len(base_dir), storage.redact(base),
                                  default=settings["max_length"], flag="max_length")
    if resolved != (params.max_length or settings["max_length"]):
        logger.info("max_length %d: the preset's %d capped at the base's max_seq_len", resolved, settings["max_length"])
    return TrainConfig(
        project=key[:16], base=str(base_dir), data=(str(shards),), max_steps=params.max_steps, seed=params.seed,
        results_dir=str(work / "train"), save_top_k=5, sampling=params.sampling.value,
        init_lora=str(local_file(init_lora, work / "inputs")) if init_lora else None,
        devices=params.devices, num_nodes=params.num_nodes, strategy=params.strategy.value,
        process_group_backend=params.process_group_backend.value if params.process_group_backend else None,
        **{**settings, "max_length": resolved},  # the key and the metadata keep the request
    )


@task(name="train", cache_policy=TRAIN.cache_policy, persist_result=True)
def train_task(pack_url: str, base: str, store_root: str, params: TrainParams = TrainParams(),
               init_lora: str | None = None, work_dir: str | None = None) -> dict:
    """LoRA-train ``base`` on the shards at ``pack_url``; resume the run folder if it exists.

    ``params.max_length`` None: the preset's, capped at the base's ``max_seq_len``; a longer
    explicit value fails before training (:func:`fish_speech_core.finetune.limits.resolve_max_length`).
    With ``params.num_nodes`` > 1 this is node 0 (it publishes); the other nodes run
    :func:`train_node_task`.
    """
    logger = run_logger("fishtune.train")

    def compute(tmp: Path):
        from prefect.artifacts import create_table_artifact

        from fish_speech_core.finetune.steps import checkpoint_step
        from fish_speech_core.finetune.train import train

        work = work_folder(store_root, work_dir)
        config = train_config(params, key, work, pack_url, base, init_lora, logger)
        config.run_dir.mkdir(parents=True, exist_ok=True)
        logger.info("training in %s (resumes from its newest checkpoint if any)", config.run_dir)
        result = train(config, resume="auto", progress=ProgressReport(params.project, params.max_steps),
                       progress_every=params.progress_every, show_progress=True)
        if result.resumed_from is not None:
            logger.info("resumed from %s", result.resumed_from.name)
        summary = json.loads((config.run_dir / "summary.json").read_text())
        summary["resumed_from_step"] = checkpoint_step(result.resumed_from) if result.resumed_from else None
        summary["base_sha256"] = storage.hash_any(str(Path(config.base) / "model.pth"))
        files = {f"checkpoints/{p.name}": p for p in result.checkpoints}
        files |= {name: config.run_dir / name for name in ("history.json", "lora.json", "config.json")
                  if (config.run_dir / name).is_file()}
        table = [{"step": r["step"], "train_loss": r.get("train_loss"), "val_loss": r.get("val_loss")} for r in result.history]
        create_table_artifact(table, key=artifact_key("fishtune", params.project, "train-curve"),
                              description="LoRA training curve")
        return files, summary

    args = {"pack_url": pack_url, "base": base, "init_lora": init_lora, "params": params}
    key = TRAIN.key(args)
    done = TRAIN.run(store_root, args, compute)
    return _result(done.artifact.url, done.summary, done.result)


@task(name="train-node", cache_policy=NO_CACHE, persist_result=False)
def train_node_task(pack_url: str, base: str, store_root: str, params: TrainParams, node_rank: int,
                    init_lora: str | None = None, work_dir: str | None = None) -> dict:
    """Node ``node_rank`` (> 0) of a multi-node training: trains its share in its host's run folder
    for the stage key, publishes nothing (node 0 does) and is never cached (the stage's cache
    record is node 0's). The rendezvous comes from its job's environment (``NODE_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``: :func:`fishtune.flows.gpu.train_job_variables`)."""
    from fish_speech_core.finetune.distributed import Rendezvous
    from fish_speech_core.finetune.limits import TrainError
    from fish_speech_core.finetune.steps import checkpoint_step
    from fish_speech_core.finetune.train import train

    logger = run_logger("fishtune.train")
    rendezvous = Rendezvous.from_env(os.environ)
    if rendezvous.node_rank != node_rank:
        raise TrainError(f"train node {node_rank}: its job environment says NODE_RANK={rendezvous.node_rank}; "
                         f"the launcher sets both from train_job_variables()")
    key = TRAIN.key({"pack_url": pack_url, "base": base, "init_lora": init_lora, "params": params})
    config = train_config(params, key, work_folder(store_root, work_dir), pack_url, base, init_lora, logger)
    logger.info("node %d of %d: training in %s", node_rank, params.num_nodes, config.run_dir)
    result = train(config, resume="auto", show_progress=False, rendezvous=rendezvous)
    return {"node_rank": node_rank, "rank": result.rank, "world_size": result.world_size,
            "final_step": result.final_step,
            "resumed_from_step": checkpoint_step(result.resumed_from) if result.resumed_from else None}


def _result(url: str, summary: dict, result) -> dict:
    rec = summary.get("recommended") or {}
    recommended = storage.join(url, "checkpoints", Path(rec["checkpoint"]).name) if rec.get("checkpoint") else None
    kept = [storage.join(url, "checkpoints", Path(p).name) for p in summary.get("checkpoints", [])]
    small = {
        "final_step": summary["final_step"],
        "resumed_from_step": summary.get("resumed_from_step"),
        "history": summary.get("history", []),
        "recommended_step": rec.get("step"),
        "recommended_note": rec.get("note"),
        "num_truncated": summary.get("num_truncated", 0),
        "coverage": summary.get("coverage", {}),
    }
    return result(small, checkpoint=recommended or (kept[-1] if kept else None), checkpoints=kept)
