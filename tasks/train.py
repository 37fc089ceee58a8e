"""Thin Prefect tasks for LoRA training and the merge: packed shards -> adapter -> merged model.

``train`` is never retried blindly: it trains in a content-addressed run folder
(``<work>/train/<key>/``), so a rerun after a failure resumes from that folder's newest
checkpoint (step counter, optimizer and history continue). It reports progress to the Prefect
UI (a progress artifact updated every N steps), publishes checkpoints + history to
``<root>/train/<key>/`` and a table artifact of the curve. ``merge`` writes each merged model
to a new versioned folder ``<root>/models/<project>/<version>/``, never over an earlier one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from prefect import get_run_logger, task

from fish_speech_core import storage
from fish_speech_core.storage import Store, local_file, local_tree
from fishtune.tasks.caching import content_policy

# Test-only fault injection: with this set to N, train raises once (per run folder) at the first
# step past a saved checkpoint once N steps are done, to exercise resume. Never set in production.
FAULT_ENV = "FISHTUNE_INJECT_TRAIN_FAULT"
FAULT_MARKER = ".fault-injected"
MODELS = "models"

# Training presets (FinetuneConfig.preset): LoRA shape and the batch/length/validation cadence.
PRESETS: dict[str, dict] = {
    "tiny": dict(lora_r=4, lora_alpha=8.0, batch_size=2, max_length=256, val_check_interval=10, lr=1e-3,
                 warmup_steps=2, val_fraction=0.2, val_batch_size=4),
    "small": dict(lora_r=8, lora_alpha=16.0, batch_size=8, max_length=4096, val_check_interval=100, lr=1e-4),
    "large": dict(lora_r=32, lora_alpha=64.0, batch_size=8, max_length=4096, val_check_interval=100, lr=1e-4),
}


class WarmStartError(ValueError):
    """warm_start asked for, but no usable earlier LoRA of this project."""


def preset_settings(preset: str) -> dict:
    return dict(PRESETS[preset])


class _Progress:
    """Progress hook: Prefect progress artifact every ``every`` steps, plus the test-only fault."""

    def __init__(self, run_dir: Path, every: int, fault_after: int | None, progress_id=None):
        self.run_dir, self.every, self.fault_after, self.progress_id = run_dir, max(1, every), fault_after, progress_id

    def __call__(self, info: dict) -> None:
        step, total = info["step"], info["max_steps"]
        if self.progress_id is not None and (step % self.every == 0 or step == total):
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.progress_id, progress=100.0 * step / total)
        if self.fault_after is not None and step > self.fault_after and not (self.run_dir / FAULT_MARKER).exists():
            from fish_speech_core.finetune.checkpoints import list_checkpoints

            if list_checkpoints(self.run_dir / "checkpoints"):
                (self.run_dir / FAULT_MARKER).write_text(str(step))
                raise RuntimeError(f"injected training fault at step {step} ({FAULT_ENV})")


def _artifact_key(*parts: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())[:100]


# Also the key of flows.train.train_on_pool: one definition of what invalidates a training run.
TRAIN_CACHE = content_policy(["pack_url", "base", "init_lora"], ignore=["work_dir", "progress_every", "project"])


@task(
    name="train",
    cache_policy=TRAIN_CACHE,
    persist_result=True,
)
def train_task(
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
    """LoRA-train ``base`` on the shards at ``pack_url``; resume the run folder if it exists.

    ``max_length`` None: the preset's, capped at the base's ``max_seq_len``; a longer explicit
    value fails before training (:func:`fish_speech_core.finetune.train.resolve_max_length`).
    """
    from prefect.artifacts import create_progress_artifact, create_table_artifact

    from fish_speech_core.files import sha256_file
    from fish_speech_core.finetune.module import TrainConfig
    from fish_speech_core.finetune.limits import base_max_seq_len, resolve_max_length
    from fish_speech_core.finetune.train import train

    logger = get_run_logger()
    store = Store(store_root)
    work = Path(work_dir)
    settings = preset_settings(preset)
    inputs = {"pack": storage.hash_tree(pack_url), "base": storage.hash_any(base)}
    if init_lora:
        inputs["init_lora"] = storage.hash_any(init_lora)
    # sampling always (the default changed what training does); max_length only when set, the
    # preset's default being a function of the (hashed) base
    params = {"preset": preset, "settings": settings, "max_steps": max_steps, "seed": seed, "sampling": sampling}
    if max_length is not None:
        params["max_length"] = max_length
    key = storage.artifact_key("train", inputs, params, storage.code_version())
    artifact = store.lookup("train", key)
    if artifact is not None:  # trained before (e.g. by another project's run): reuse
        summary = json.loads(store.read_bytes(f"train/{key}/summary.json"))
        return _result(store, key, artifact.url, summary, reused=True)

    shards = local_tree(pack_url, work / "inputs")
    base_dir = local_tree(base, work / "inputs")
    # the preset's length is a default: capped at what the base attends to; a set one must fit
    resolved = resolve_max_length(max_length, base_max_seq_len(base_dir), storage.redact(base),
                                  default=settings["max_length"], flag="max_length")
    if resolved != (max_length or settings["max_length"]):
        logger.info("max_length %d: the preset's %d capped at the base's max_seq_len", resolved, settings["max_length"])
    settings = {**settings, "max_length": resolved}  # params (the key and the metadata) keep the request
    config = TrainConfig(
        project=key[:16], base=str(base_dir), data=(str(shards),), max_steps=max_steps, seed=seed,
        results_dir=str(work / "train"), save_top_k=5, sampling=sampling,
        init_lora=str(local_file(init_lora, work / "inputs")) if init_lora else None, **settings,
    )
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    fault = os.environ.get(FAULT_ENV)
    progress_id = create_progress_artifact(
        0.0, key=_artifact_key("fishtune", project, "train-progress"), description=f"LoRA training, {max_steps} steps"
    )
    hook = _Progress(run_dir, progress_every, int(fault) if fault else None, progress_id)
    logger.info("training in %s (resumes from its newest checkpoint if any)", run_dir)
    result = train(config, resume="auto", progress=hook, progress_every=1, show_progress=True)
    if result.resumed_from is not None:
        logger.info("resumed from %s", result.resumed_from.name)

    summary = json.loads((run_dir / "summary.json").read_text())
    summary["resumed_from_step"] = _step(result.resumed_from) if result.resumed_from else None
    summary["base_sha256"] = sha256_file(base_dir / "model.pth")
    files = {f"checkpoints/{p.name}": p for p in result.checkpoints}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("history.json", "lora.json", "config.json"):
            if (run_dir / name).is_file():
                files[name] = run_dir / name
        (Path(tmp) / "summary.json").write_text(json.dumps(summary, indent=2))
        files["summary.json"] = Path(tmp) / "summary.json"
        artifact = store.publish("train", key, files, metadata={"inputs": inputs, "params": params})
    table = [{"step": r["step"], "train_loss": r.get("train_loss"), "val_loss": r.get("val_loss")} for r in result.history]
    create_table_artifact(table, key=_artifact_key("fishtune", project, "train-curve"), description="LoRA training curve")
    return _result(store, key, artifact.url, summary, reused=False)


def _step(path: Path) -> int:
    return int(re.search(r"(\d+)", Path(path).stem).group(1))


def _result(store: Store, key: str, url: str, summary: dict, reused: bool) -> dict:
    rec = summary.get("recommended") or {}
    recommended = None
    if rec.get("checkpoint"):
        recommended = storage.join(url, "checkpoints", Path(rec["checkpoint"]).name)
    kept = [storage.join(url, "checkpoints", Path(p).name) for p in summary.get("checkpoints", [])]
    small = {
        "final_step": summary["final_step"],
        "resumed_from_step": summary.get("resumed_from_step"),
        "history": summary.get("history", []),
        "recommended_step": rec.get("step"),
        "recommended_note": rec.get("note"),
        "num_truncated": summary.get("num_truncated", 0),
        "coverage": summary.get("coverage", {}),
        "reused_artifact": reused,
    }
    return {"stage": "train", "key": key, "url": url, "checkpoint": recommended or (kept[-1] if kept else None),
            "checkpoints": kept, "summary": small}


@task(name="merge", cache_policy=content_policy(["checkpoint", "base"], ignore=["work_dir"]), persist_result=True)
def merge_task(checkpoint: str, base: str, store_root: str, work_dir: str, project: str, train_key: str = "") -> dict:
    """Fold the adapter into the base; publish it to a NEW folder ``models/<project>/<version>``."""
    from prefect.artifacts import create_link_artifact

    from fish_speech_core.finetune.lora import read_adapter
    from fish_speech_core.finetune.merge import merge_checkpoint

    store = Store(store_root)
    work = Path(work_dir)
    ckpt = local_file(checkpoint, work / "inputs")
    base_dir = local_tree(base, work / "inputs")
    adapter = read_adapter(ckpt)
    if adapter.metadata is None:
        raise ValueError(f"{storage.redact(checkpoint)} carries no LoRA metadata; merge it with `fishtune merge`")
    inputs = {"checkpoint": storage.hash_url(checkpoint), "base": storage.hash_any(base)}
    key = storage.artifact_key("merge", inputs, {}, storage.code_version())
    # Version = UTC time + key: sorts by creation and never collides with an earlier model.
    version = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + key[:12]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        report = merge_checkpoint(base_dir, ckpt, out, adapter.metadata.settings)
        lineage = {"project": project, "version": version, "adapter": checkpoint, "train_key": train_key,
                   "base_sha256": adapter.metadata.base_sha256, "inputs": inputs,
                   "created": datetime.now(timezone.utc).isoformat(), "max_logit_diff": report.max_logit_diff}
        (out / "lineage.json").write_text(json.dumps(lineage, indent=2))
        artifact = store.publish(f"{MODELS}/{project}", version, out, metadata=lineage)
    create_link_artifact(artifact.url if not store.local else storage.local_path(artifact.url).resolve().as_uri(),
                         link_text=f"merged model {project} {version}",
                         key=_artifact_key("fishtune", project, "merged-model"))
    return {"stage": "merge", "key": key, "url": artifact.url, "version": version,
            "summary": {"version": version, "changed_tensors": report.changed_tensors,
                        "total_tensors": report.total_tensors, "max_logit_diff": report.max_logit_diff}}


def latest_lora(store: Store, project: str, base: str) -> str:
    """The adapter URL of this project's newest merged model; its base must be ``base``.

    Raises:
        WarmStartError: no earlier model, or it was trained on a different base.
    """
    fs, root = storage.filesystem(store.url(MODELS, project))
    try:
        markers = sorted(fs.glob(root.rstrip("/") + f"/*/{storage.MARKER}"))
    except FileNotFoundError:
        markers = []
    if not markers:
        raise WarmStartError(f"warm_start: project {project!r} has no earlier merged model in {store}; "
                             f"run once without warm_start first")
    newest = Path(markers[-1]).parent.name  # versions sort by UTC time
    lineage = json.loads(store.read_bytes(f"{MODELS}/{project}/{newest}/lineage.json"))
    base_sha = storage.hash_url(storage.join(storage.normalize_url(base), "model.pth"))
    if lineage.get("base_sha256") and lineage["base_sha256"] != base_sha:
        raise WarmStartError(
            f"warm_start: the latest LoRA of {project!r} ({newest}) was trained on base model.pth sha256 "
            f"{lineage['base_sha256'][:12]}…, this base is {base_sha[:12]}…; use the same base or run without warm_start"
        )
    return lineage["adapter"]


def _logger():
    """The run logger inside a Prefect run; a plain logger when the body runs through ``.fn()``."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        return logging.getLogger("fishtune.evaluate")


@task(name="evaluate", cache_policy=content_policy(["train_url", "base", "codec", "normalized_url", "pack_url"],
                                                   ignore=["work_dir"]),
      persist_result=True)
def evaluate_task(train_url: str, base: str, codec: str, normalized_url: str, store_root: str, work_dir: str,
                  pack_url: str | None = None, sentences_per_speaker: int = 3, max_new_tokens: int = 1024, seed: int = 0,
                  max_references: int = 8, text_extension: str = ".lab", asr: str | None = None) -> dict:
    """Previews of the base and each kept checkpoint for every speaker, scored per speaker and per checkpoint.

    Per speaker (:mod:`fish_speech_core.evaluate.selection`): prompt = one of its real clips,
    ``sentences_per_speaker`` held-out sentences (the trainer's validation split of the shards at
    ``pack_url`` when known, else other clips' transcripts), similarity against its other clips.
    Preview sets are cached by content under ``<work>/evaluate/previews/``. Publishes
    ``evaluate/<key>/<base|step_N>/<speaker>/NN.wav`` + ``prompts/<speaker>/<clip>`` +
    ``scores.json`` + ``plot.png``; returns the checkpoint :func:`recommend_checkpoint` picks
    from the per-checkpoint means over speakers (its URL in the train artifact).
    """
    from fish_speech_core.evaluate.checkpoints import Candidate, evaluate_checkpoints
    from fish_speech_core.evaluate.plot import plot_checkpoints
    from fish_speech_core.evaluate.previews import recommend_checkpoint
    from fish_speech_core.evaluate.selection import held_out_texts, plan_previews, speaker_clips

    logger = _logger()
    store = Store(store_root)
    work = Path(work_dir)
    inputs = {"train": storage.hash_tree(train_url), "base": storage.hash_any(base), "codec": storage.hash_any(codec),
              "normalized": storage.hash_tree(normalized_url)}
    if pack_url:
        inputs["pack"] = storage.hash_tree(pack_url)
    params = {"max_new_tokens": max_new_tokens, "seed": seed, "sentences_per_speaker": sentences_per_speaker,
              "max_references": max_references, "text_extension": text_extension}
    if asr:  # only then: keys of runs without ASR stay what they were
        params["asr"] = asr
    key = storage.artifact_key("evaluate", inputs, params, storage.code_version())
    artifact = store.lookup("evaluate", key)
    if artifact is not None:
        scores = json.loads(store.read_bytes(f"evaluate/{key}/scores.json"))
        return {"stage": "evaluate", "key": key, "url": artifact.url, "checkpoint": scores["checkpoint"],
                "summary": {**scores["summary"], "rendered": 0, "scored": 0}}
    trained = local_tree(train_url, work / "inputs")
    base_dir = local_tree(base, work / "inputs")
    codec_file = local_file(codec, work / "inputs")
    clips = speaker_clips(local_tree(normalized_url, work / "inputs"), text_extension)
    if not clips:
        raise ValueError(f"no normalized audio with transcripts in {storage.redact(normalized_url)} to preview voices with")
    held = None
    train_config = trained / "config.json"
    if pack_url and train_config.is_file():  # the trainer's own validation split, recomputed from the shards
        val_fraction = json.loads(train_config.read_text()).get("val_fraction")
        if val_fraction:
            held = held_out_texts(local_tree(pack_url, work / "inputs"), float(val_fraction)) or None
    plans = plan_previews(clips, sentences_per_speaker, held, max_references)
    for plan in plans:
        logger.info("speaker %s: prompt %s, %d sentence(s) from %s%s", plan.speaker, plan.prompt.audio.name,
                    len(plan.sentences), plan.source, f" ({plan.note})" if plan.note else "")
    history = {r["step"]: r for r in json.loads((trained / "history.json").read_text())}
    candidates = [Candidate("base", 0)] + [
        Candidate(p.stem, _step(p), p) for p in sorted((trained / "checkpoints").glob("step_*.ckpt"))]
    transcriber = None
    if asr:
        from fish_speech_core.evaluate.asr import load_transcriber

        transcriber = load_transcriber(asr)
    evaluation = evaluate_checkpoints(base_dir, candidates, codec_file, plans, work / "evaluate" / "previews",
                                      seed=seed, max_new_tokens=max_new_tokens, transcriber=transcriber, log=logger.info)
    rows = [{**r, "val_loss": history.get(r["step"], {}).get("val_loss")} for r in evaluation.rows]
    for row in rows:
        if row["problem"]:
            logger.warning("previews of %s: %s", row["name"], row["problem"])
    pick, rule = recommend_checkpoint([r for r in rows if r["name"] != "base"])
    checkpoint = storage.join(train_url, "checkpoints", f"{pick['name']}.ckpt")
    files = dict(evaluation.files)
    speakers = []
    for plan in plans:
        prompt = f"prompts/{plan.speaker}/{plan.prompt.audio.name}"
        files[prompt] = plan.prompt.audio
        speakers.append({"speaker": plan.speaker, "prompt": prompt, "prompt_text": plan.prompt.text,
                         "sentences": list(plan.sentences), "source": plan.source, "note": plan.note,
                         "references": len(plan.references)})
    # Paths in the summary ("previews", "prompt", "plot") are relative to the artifact: the report links them on the store.
    summary = {"rows": rows, "speakers": speakers, "recommended_step": pick["step"], "rule": rule, "plot": "plot.png"}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "scores.json").write_text(json.dumps({"checkpoint": checkpoint, "summary": summary}, indent=2))
        files["scores.json"] = Path(tmp) / "scores.json"
        files["plot.png"] = plot_checkpoints(rows, Path(tmp) / "plot.png")
        artifact = store.publish("evaluate", key, files, metadata={"inputs": inputs, "params": params})
    return {"stage": "evaluate", "key": key, "url": artifact.url, "checkpoint": checkpoint,
            "summary": {**summary, "rendered": evaluation.rendered, "scored": evaluation.scored}}
