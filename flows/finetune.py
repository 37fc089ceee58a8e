"""The ``finetune`` flow: validate -> normalize -> extract -> pack -> train -> (evaluate) -> merge.

It only wires: each stage is a task keyed by its input content (:mod:`fishtune.tasks.stage`), run
in this process or, with ``gpu_pool``, as a child run on the GPU pool (:mod:`fishtune.flows.gpu`);
extract and (with ``cpu_pool``, on large data) validate and normalize can run as K shard children
(:mod:`fishtune.flows.shards`).
A rerun with nothing changed is all ``Cached``; a failed stage fails the flow. The run manifest
and report (:mod:`fishtune.flows.report`) land in ``<storage>/runs/<run id>/``.
"""

from __future__ import annotations

import inspect
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import Task, flow, get_run_logger
from prefect.artifacts import create_image_artifact, create_markdown_artifact
from prefect.runtime import flow_run

from fish_speech_core import storage
from fish_speech_core.doctor import check_compatibility, read_codec_config
from fish_speech_core.finetune.steps import checkpoint_step
from fish_speech_core.links import browser_link
from fish_speech_core.registry import latest_lora
from fish_speech_core.storage import RunManifest, StageRecord, Store
from fishtune.flows.config import FinetuneConfig
from fishtune.flows import cpu
from fishtune.flows.gpu import DEPLOYMENTS, EXTRACT_SHARDS, LAUNCHERS, LOCAL
from fishtune.flows.shards import run_on_shards
from fishtune.flows.report import plot_url, report_markdown
from fishtune.tasks import data as data_tasks
from fishtune.tasks.remote import check_pool, gpu_slots
from fishtune.tasks.runtime import bind, default_work_dir
from fishtune.tasks.stage import artifact_key

def chosen_checkpoint(checkpoints: list[str], step: int) -> str:
    """The kept checkpoint URL of training step ``step``; ValueError names the kept steps otherwise."""
    by_step = {checkpoint_step(c): c for c in checkpoints}
    if step not in by_step:
        raise ValueError(f"merge_step {step}: no kept checkpoint of that step; kept steps: {sorted(by_step)}")
    return by_step[step]


def _check_models(config: FinetuneConfig) -> None:
    """Refuse a base checkpoint and codec that do not belong together (``fishtune doctor``'s check)."""
    local = [p for p in (config.base, config.codec) if p and "://" not in p]
    if not config.base or not config.codec or len(local) < 2:
        return  # remote models are checked by the stages that download them
    try:
        read_codec_config(config.codec)
    except Exception:  # noqa: BLE001 - an unreadable codec is the extract stage's to report, with its reason
        return
    errors = [f for f in check_compatibility(config.base, config.codec) if f.level == "error"]
    if errors:
        raise ValueError("the base model and the codec do not belong together:\n" + "\n".join(
            f"- {f.what}: {f.what_to_do}" for f in errors))


def _check_max_length(config: FinetuneConfig) -> None:
    """Refuse a max_length the (local) base cannot attend to before any stage; the train task
    makes the same check for a remote base once it has it."""
    if config.max_length is None or not config.base or "://" in config.base:
        return
    from fish_speech_core.finetune.limits import TrainError, base_max_seq_len, resolve_max_length

    try:
        max_seq_len = base_max_seq_len(config.base)
    except TrainError:
        return  # an unreadable base is the train stage's to report, with its reason
    resolve_max_length(config.max_length, max_seq_len, config.base, flag="max_length")


def run_name() -> str:
    """``finetune/<project>/<yyyymmdd-hhmm>`` (UTC): what the UI lists, so runs tell apart."""
    config = flow_run.parameters.get("config") or {}
    project = config.get("project", "demo") if isinstance(config, dict) else config.project
    return f"finetune/{project}/{datetime.now(timezone.utc):%Y%m%d-%H%M}"


def run_tags(project: str, stage: str | None = None) -> list[str]:
    return ["fishtune", f"project:{project}"] + ([f"stage:{stage}"] if stage else [])


SHARDED = {"extract": EXTRACT_SHARDS, "validate": cpu.VALIDATE_SHARDS, "normalize": cpu.NORMALIZE_SHARDS}  # the stages that can run on K shards


@dataclass
class Stages:
    """Runs the stages of one finetune run: binds each task to the run's store and lock folder,
    sends the GPU stages to the pool when asked, names the runs and records each in the manifest."""

    config: FinetuneConfig
    store: Store
    work_dir: Path
    manifest: RunManifest
    pool_checked: set[str] = field(default_factory=set)

    def __call__(self, name: str, inputs: dict[str, str], task: Task | None = None, title: str = "", shards: int = 1,
                 **arguments) -> dict:
        project = self.config.project
        started = time.perf_counter()
        if shards > 1:  # one child run per shard on the stage's pool, then their merge here
            self._check_pool(f"{name}-shard")
            state = run_on_shards(SHARDED[name], self.store, self.work_dir, shards, f"{name}/{project}{title}",
                                  run_tags(project, name), **arguments)
        else:
            if task is None and self.config.gpu_pool:  # a child flow run on the GPU pool (it resolves its own work folder)
                self._check_pool(name)
                task = LAUNCHERS[name]
                arguments |= {"run_name": f"{name}/{project}{title}", "run_tags": run_tags(project, name)}
            else:
                task = task or LOCAL[name]
                if "work_dir" in inspect.signature(task.fn).parameters:
                    arguments["work_dir"] = str(self.work_dir)
            bound = bind(task, self.store, self.work_dir).with_options(task_run_name=f"{name}/{project}{title}")
            state = bound(store_root=self.store.root, **arguments, return_state=True)
        seconds = time.perf_counter() - started
        result = state.result()  # raises the task's exception: a failed stage fails the flow
        self.manifest.stages.append(StageRecord(
            stage=result["stage"], key=result["key"], url=result["url"], cached=state.name == "Cached",
            seconds=round(seconds, 3), inputs=inputs,
            outputs={k: result[k] for k in ("url", "manifest", "shards", "checkpoint") if result.get(k)},
            summary=result.get("summary", {}),
        ))
        return result

    def extract_shards(self) -> int:
        """K, the extraction child runs: the config's, else one per slot of the ``gpu`` limit
        with a GPU pool (1 without one)."""
        if not self.config.gpu_pool:
            return 1
        return self.config.extract_shards or gpu_slots()

    def _check_pool(self, name: str) -> None:
        if name not in self.pool_checked:
            if name in cpu.DEPLOYMENTS:
                check_pool(cpu.DEPLOYMENTS[name], self.config.cpu_pool, flag="cpu_pool")
            else:
                check_pool(DEPLOYMENTS[name], self.config.gpu_pool)
            if name == "train":  # a train child takes one slot of the `gpu` limit per process: fewer would wait for ever
                needed, slots = self.config.train_params().processes_per_node() or 1, gpu_slots()
                if needed > slots:
                    raise ValueError(f"devices {self.config.devices}: a train node takes {needed} slots of the "
                                     f"'gpu' concurrency limit, which has {slots}; run fishtune deploy --gpus "
                                     f"{needed} (one slot per GPU of a host) or train on fewer devices")
            self.pool_checked.add(name)


@dataclass
class Outputs:
    normalized: str | None = None
    chosen: str | None = None  # what was merged: the previews' pick with evaluate, else train's
    merged: str | None = None


def pipeline(config: FinetuneConfig, run: Stages, out: Outputs) -> None:
    """The stages in order; stops early (with a warning) when a model needed later was not given."""
    logger = get_run_logger()
    manifest = run.manifest
    data_dir = data_tasks.fetch_data(config.data, str(run.work_dir), [config.speaker] if config.speaker else None)
    if config.base:  # lineage: the merged model will point back to these exact base weights
        manifest.inputs["base"] = storage.hash_any(config.base)
    validated = run("validate", {"data": storage.redact(config.data)}, data_tasks.validate_task,
                    shards=config.data_shards_for(data_tasks.data_items(data_dir)), data_dir=data_dir,
                    params=config.validate_params())
    manifest.inputs["data"] = validated["data_sha256"]
    if not validated["summary"]["accepted"]:
        raise ValueError(f"no accepted audio in {storage.redact(config.data)}: see {validated['url']}/report.md")
    normalized = run("normalize", {"data": validated["data_sha256"]}, data_tasks.normalize_task,
                     shards=config.data_shards_for(validated["summary"]["accepted"]), data_dir=data_dir,
                     params=config.normalize_params())
    out.normalized = normalized["url"]
    if not config.codec:
        logger.warning("no --codec given: stopping after normalize (extract, pack and train need it)")
        return
    tokens = run("extract", {"normalize": normalized["key"]}, shards=run.extract_shards(),
                 normalized_url=normalized["url"], codec=config.codec,
                 params=config.extract_params(), workspace=config.workspace())
    packed = run("pack", {"extract": tokens["key"]}, data_tasks.pack_task, codes_dir=tokens["url"],
                 params=config.pack_params())
    if not config.base:
        logger.warning("no --base given: stopping after pack (train and merge need a base model)")
        return
    init_lora = latest_lora(run.store, config.project, config.base) if config.warm_start else None
    if init_lora:
        manifest.inputs["init_lora"] = storage.redact(init_lora)
    # resumes its own run folder after a failure, never a blind retry
    lora = run("train", {"pack": packed["key"], "base": manifest.inputs["base"]}, title=f"/{config.max_steps}",
               pack_url=packed["url"], base=config.base, params=config.train_params(), init_lora=init_lora)
    if not lora["checkpoint"]:
        raise RuntimeError(f"training published no checkpoint: see {storage.redact(lora['url'])}")
    out.chosen = lora["checkpoint"]
    if config.evaluate:  # previews decide which checkpoint is merged
        scored = run("evaluate", {"train": lora["key"]}, train_url=lora["url"], base=config.base, codec=config.codec,
                     normalized_url=normalized["url"], pack_url=packed["url"], params=config.evaluate_params())
        out.chosen = scored["checkpoint"]
        _plot_artifact(config.project, manifest.stages[-1])
    if config.merge_step is not None:  # the user's choice overrides the recommendation
        out.chosen = chosen_checkpoint(lora["checkpoints"], config.merge_step)
        manifest.inputs["merge_step"] = str(config.merge_step)
    merged = run("merge", {"checkpoint": out.chosen, "base": manifest.inputs["base"]}, checkpoint=out.chosen,
                 base=config.base, params=config.merge_params(train_key=lora["key"]))
    out.merged = merged["url"]


def _plot_artifact(project: str, evaluated: StageRecord) -> None:
    """An image artifact for the plot, only when the UI can fetch it (an https link)."""
    link = browser_link(storage.join(evaluated.url, evaluated.summary["plot"])) if evaluated.summary.get("plot") else None
    if link:
        create_image_artifact(link, key=artifact_key("fishtune", project, "checkpoint-plot"),
                              description="loss and similarity vs step")


def tag_this_run(project: str) -> None:
    """Add ``fishtune`` and ``project:<name>`` to this flow run's tags (a run from the UI or a
    trigger carries only its deployment's)."""
    run_id = flow_run.get_id()
    if not run_id:
        return
    from prefect import get_client

    with get_client(sync_client=True) as client:
        tags = list(client.read_flow_run(run_id).tags or [])
        client.update_flow_run(run_id, tags=sorted({*tags, *run_tags(project)}))


def _was_cancelled() -> bool:
    """This run is being cancelled (from the UI or the API), not failing."""
    run_id = flow_run.get_id()
    if not run_id:
        return False
    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
    except Exception:  # noqa: BLE001 - the API is unreachable: the stage's error is what matters
        return False
    return state is not None and state.name in ("Cancelling", "Cancelled")


@flow(name="finetune", log_prints=True, persist_result=True, flow_run_name=run_name)
def finetune(config: FinetuneConfig, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Finetune Fish Speech 1.4 on a dataset: validate, normalize (then extract, pack, train, merge).

    ``overrides``: the fields a project run changed from the project's saved spec (recorded only).
    """
    logger = get_run_logger()
    store = Store(config.storage)
    work_dir = Path(config.work_dir) if config.work_dir else default_work_dir(store)
    run_id = flow_run.get_id() or uuid.uuid4().hex
    parameters = config.manifest_parameters()
    if overrides:
        parameters["overrides"] = dict(overrides)
    manifest = RunManifest(str(run_id), "finetune", parameters, versions=storage.versions())
    logger.info("storage %s, work folder %s", store, work_dir)
    tag_this_run(config.project)
    out = Outputs()
    try:
        _check_models(config)  # before any heavy step: a 1.2/1.4 mix-up fails here, not deep in training
        _check_max_length(config)
        pipeline(config, Stages(config, store, work_dir, manifest), out)
        manifest.status = "completed"
    except BaseException:
        manifest.status = "cancelled" if _was_cancelled() else "failed"
        raise
    finally:
        manifest.finished = datetime.now(timezone.utc).isoformat()
        markdown = report_markdown(config, manifest)
        create_markdown_artifact(markdown, key=artifact_key("fishtune", config.project, "report"),
                                 description=f"finetune run {run_id}")
        try:
            written = storage.write_manifest(store, manifest, markdown)
        except Exception as exc:
            if manifest.status == "completed":
                raise
            logger.error("could not write the run manifest either: %s", storage.redact_text(exc))  # keep the stage's error
        else:
            logger.info("run manifest %s, report %s", storage.redact(written["manifest"]), storage.redact(written["report"]))
    return {
        "run_id": manifest.run_id,
        "status": manifest.status,
        "manifest": written["manifest"],
        "report": written["report"],
        "stages": [asdict(s) for s in manifest.stages],
        "normalized": out.normalized,
        "recommended_checkpoint": out.chosen,
        "merged_model": out.merged,
    }
