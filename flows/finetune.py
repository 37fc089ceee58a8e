"""The ``finetune`` flow: validate -> normalize -> (extract -> pack -> train -> merge -> evaluate).

Every stage is a cached task keyed by input content; a rerun with nothing changed is all
``Cached``. Each stage result is resolved here (``return_state=True`` + ``.result()``), so a
failed stage fails the flow. The run manifest and report land in ``<storage>/runs/<run id>/``.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_image_artifact, create_markdown_artifact
from prefect.runtime import flow_run

from fish_speech_core import storage
from fish_speech_core.doctor import check_compatibility, read_codec_config
from fish_speech_core.storage import RunManifest, StageRecord, Store
from fishtune.flows.config import FinetuneConfig
from fishtune.flows.extract import extract_on_pool
from fishtune.flows.train import train_on_pool
from fishtune.tasks import data as data_tasks
from fishtune.tasks.codec import extract_task
from fishtune.tasks.runtime import bind, default_work_dir
from fishtune.tasks.train import evaluate_task, latest_lora, merge_task, train_task


def _run_stage(manifest: RunManifest, task, inputs: dict[str, str], **kwargs) -> dict:
    """Run one task, record its wall time and cache hit, and raise if it failed."""
    started = time.perf_counter()
    state = task(**kwargs, return_state=True)
    seconds = time.perf_counter() - started
    result = state.result()  # raises the task's exception: a failed stage fails the flow
    record = StageRecord(
        stage=result["stage"],
        key=result["key"],
        url=result["url"],
        cached=state.name == "Cached",
        seconds=round(seconds, 3),
        inputs=inputs,
        outputs={k: result[k] for k in ("url", "manifest", "shards", "checkpoint") if k in result and result[k]},
        summary=result.get("summary", {}),
    )
    manifest.stages.append(record)
    return result


def plot_url(evaluated: StageRecord) -> str:
    """Where the evaluate stage's loss/similarity plot lives on the store (redacted URL or local path)."""
    return storage.redact(storage.join(evaluated.url, evaluated.summary["plot"]))


# Per-file counters of the stages that keep per-file work (normalize, extract): (redone, reused).
PER_FILE_COUNTS = {"normalize": ("written", "skipped"), "extract": ("extracted", "skipped")}


def cache_label(stage: str, cached: bool, summary: dict) -> str:
    """``hit``; or ``miss``, with what the stage reused when it ran: ``miss (1 of 26 files redone)``
    or ``miss (artifact reused)`` (the same inputs were published before, e.g. by another project)."""
    if cached:
        return "hit"
    if summary.get("reused_artifact"):
        return "miss (artifact reused)"
    redone_key, reused_key = PER_FILE_COUNTS.get(stage, (None, None))
    if redone_key and summary.get(reused_key):
        redone = int(summary.get(redone_key, 0))
        return f"miss ({redone} of {redone + int(summary[reused_key])} files redone)"
    return "miss"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def coverage_section(coverage: dict[str, dict[str, int]]) -> list[str]:
    """Per speaker: sentences seen in training / sentences in the training split."""
    lines = ["| speaker | sentences seen / sentences in the training split |", "|---|---:|"]
    for speaker, row in sorted(coverage.items()):
        share = row["seen"] / row["sentences"] if row["sentences"] else 0.0
        lines.append(f"| {_cell(speaker)} | {row['seen']} / {row['sentences']} ({share:.0%}) |")
    return lines


def preview_section(evaluated: StageRecord, overridden: bool = False) -> list[str]:
    """The report's Previews section: per checkpoint (means over speakers), per checkpoint and speaker
    (scores + audio links), the speakers' prompts and sentences, the plot and the pick (merged unless
    ``overridden`` by the user's merge_step)."""
    e = evaluated.summary
    num = lambda v, f: "" if v is None else format(v, f)
    on_store = lambda p: storage.redact(storage.join(evaluated.url, p))
    link = lambda p: f"[{Path(p).name}]({on_store(p)})"
    # word error rate only when an ASR engine was configured (the asr setting)
    has_wer = any(r.get("wer") is not None for r in e["rows"])
    wer_head, wer_rule = (" word error rate |", "---:|") if has_wer else ("", "")
    wer = lambda row: f" {num(row.get('wer'), '.2f')} |" if has_wer else ""
    lines = ["## Previews", "",
             "Similarity = cosine between a voice embedding of the preview and of the speaker's real clips; "
             "duration = rendered / expected seconds for the text (sane in 0.5–2); checks ok = share of clips "
             "without silence, clipping or duration problems. Per checkpoint: means over the speakers "
             "(what chooses the checkpoint).", "",
             "| model | step | val loss | similarity | duration | checks ok |" + wer_head, "|---|---:|---:|---:|---:|---:|" + wer_rule]
    lines += [f"| {r['name']} | {r['step']} | {num(r.get('val_loss'), '.4f')} | {num(r.get('similarity'), '.3f')} | "
              f"{num(r.get('duration_ratio'), '.2f')} | {num(r.get('ok_fraction'), '.0%')} |" + wer(r) for r in e["rows"]]
    lines += ["", "### Per speaker", "", "| model | speaker | similarity | duration | checks ok |" + wer_head + " previews |",
              "|---|---|---:|---:|---:|" + wer_rule + "---|"]
    for r in e["rows"]:
        # rows cached before per-speaker previews carry no "speakers": one line for the model
        for s in r.get("speakers") or [{**r, "speaker": ""}]:
            lines += [f"| {r['name']} | {_cell(s['speaker'])} | {num(s.get('similarity'), '.3f')} | "
                      f"{num(s.get('duration_ratio'), '.2f')} | {num(s.get('ok_fraction'), '.0%')} |" + wer(s) + " "
                      + (", ".join(link(p) for p in s["previews"]) or "none")
                      + (f" ({_cell(s['problem'])})" if s.get("problem") else "") + " |"]
    if e.get("speakers"):
        lines += ["", "| speaker | prompt clip | held-out sentences | from |", "|---|---|---|---|"]
        lines += [f"| {_cell(s['speaker'])} | [{Path(s['prompt']).name}]({on_store(s['prompt'])}) "
                  f"\"{_cell(s['prompt_text'])}\" | " + " / ".join(f"\"{_cell(t)}\"" for t in s["sentences"])
                  + f" | {_cell(s['source'])}" + (f" — {_cell(s['note'])}" if s.get("note") else "") + " |"
                  for s in e["speakers"]]
    if e.get("plot"):
        plot = plot_url(evaluated)
        lines += ["", f"![held-out loss and similarity vs step]({plot})", "", f"Plot: `{plot}`"]
    lines += ["", f"**{'Recommended' if overridden else 'Merged'} checkpoint (previews):** step {e['recommended_step']} — "
              f"`{storage.redact(evaluated.outputs.get('checkpoint', ''))}` ({e['rule']})"]
    return lines


def report_markdown(config: FinetuneConfig, manifest: RunManifest) -> str:
    """The run report: data summary, rejects by reason, per-stage wall time and cache hit/miss."""
    lines = [f"# fishtune finetune `{config.project}` — run `{manifest.run_id}`", ""]
    lines += [f"- data: `{storage.redact(config.data)}`" + (f" (speaker `{config.speaker}`)" if config.speaker else "")]
    lines += [f"- storage: `{storage.redact(config.storage)}`", f"- status: **{manifest.status}**", ""]
    validation = next((s for s in manifest.stages if s.stage == "validate"), None)
    if validation:
        s = validation.summary
        lines += ["## Data", "", f"{s['accepted']} accepted, {s['rejected']} rejected, {s['total_hours'] * 60:.2f} min of audio", ""]
        lines += ["| speaker | accepted | rejected | hours |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {row['accepted']} | {row['rejected']} | {row['hours']:.4f} |" for name, row in s["speakers"].items()]
        if s["rejects_by_reason"]:
            lines += ["", "| reject reason | files |", "|---|---:|"]
            lines += [f"| {reason} | {n} |" for reason, n in s["rejects_by_reason"].items()]
        lines += [f"\n> {note}" for note in s["advice"]]
        lines += [""]
    lines += ["## Stages", "", "| stage | cache | wall s | artifact |", "|---|---|---:|---|"]
    lines += [
        f"| {s.stage} | {cache_label(s.stage, s.cached, s.summary)} | {s.seconds:.2f} | `{storage.redact(s.url)}` |" for s in manifest.stages
    ]
    trained = next((s for s in manifest.stages if s.stage == "train"), None)
    if trained:
        t = trained.summary
        lines += ["", "## Training", ""]
        if t.get("resumed_from_step"):
            lines += [f"Resumed from the checkpoint at step {t['resumed_from_step']}.", ""]
        lines += ["| step | train loss | val loss |", "|---:|---:|---:|"]
        fmt = lambda v: "" if v is None else f"{v:.4f}"
        lines += [f"| {r['step']} | {fmt(r.get('train_loss'))} | {fmt(r.get('val_loss'))} |" for r in t.get("history", [])]
        if t.get("coverage"):
            lines += ["", *coverage_section(t["coverage"])]
        checkpoint = trained.outputs.get("checkpoint")
        lines += ["", f"**Recommended checkpoint:** step {t.get('recommended_step')} — `{storage.redact(checkpoint or '')}`"
                  + (f" ({t['recommended_note']})" if t.get("recommended_note") else "")]
    evaluated = next((s for s in manifest.stages if s.stage == "evaluate"), None)
    if evaluated:
        lines += ["", *preview_section(evaluated, overridden=config.merge_step is not None)]
    merged = next((s for s in manifest.stages if s.stage == "merge"), None)
    if merged and config.merge_step is not None:
        lines += ["", f"**Merged checkpoint (merge_step, your choice):** step {config.merge_step} — "
                  f"`{storage.redact(merged.inputs.get('checkpoint', ''))}`"]
    if merged:
        lines += ["", f"**Merged model:** `{storage.redact(merged.url)}` (version `{merged.summary.get('version')}`)"]
    return "\n".join(lines) + "\n"


def chosen_checkpoint(checkpoints: list[str], step: int) -> str:
    """The kept checkpoint URL of training step ``step``; ValueError names the kept steps otherwise."""
    by_step = {int(re.search(r"(\d+)", Path(c).stem).group(1)): c for c in checkpoints}
    if step not in by_step:
        raise ValueError(f"merge_step {step}: no kept checkpoint of that step; kept steps: {sorted(by_step)}")
    return by_step[step]


def _artifact_key(project: str, what: str = "report") -> str:
    return re.sub(r"[^a-z0-9-]", "-", f"fishtune-{project}-{what}".lower())


def _plot_artifact(project: str, evaluated: StageRecord) -> None:
    """An image artifact for the plot, only when the UI can fetch it (an http(s) store URL)."""
    if evaluated.summary.get("plot"):
        url = plot_url(evaluated)
        if url.startswith(("http://", "https://")):
            create_image_artifact(url, key=_artifact_key(project, "checkpoint-plot"), description="loss and similarity vs step")


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


@flow(name="finetune", log_prints=True, persist_result=True)
def finetune(config: FinetuneConfig, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Finetune Fish Speech 1.4 on a dataset: validate, normalize (then extract, pack, train, merge)."""
    logger = get_run_logger()
    store = Store(config.storage)
    work_dir = Path(config.work_dir) if config.work_dir else default_work_dir(store)
    run_id = flow_run.get_id() or uuid.uuid4().hex
    parameters = config.model_dump(mode="json")
    for name in ("data", "storage", "base", "codec"):  # URLs are recorded without any user info
        if parameters.get(name):
            parameters[name] = storage.redact(parameters[name])
    if overrides:  # what this run changed from its project's saved spec (flows/project.py)
        parameters["overrides"] = {k: storage.redact(v) if isinstance(v, str) else v for k, v in overrides.items()}
    manifest = RunManifest(str(run_id), "finetune", parameters, versions=storage.versions())
    logger.info("storage %s, work folder %s", store, work_dir)

    fetch = data_tasks.fetch_data  # I/O only: retries, no cache (the mirror is itself incremental)
    validate = bind(data_tasks.validate_task, store, work_dir)
    normalize = bind(data_tasks.normalize_task, store, work_dir)
    lora = merged = chosen = None
    try:
        _check_models(config)  # before any heavy step: a 1.2/1.4 mix-up fails here, not deep in training
        _check_max_length(config)
        data_dir = fetch(config.data, str(work_dir), [config.speaker] if config.speaker else None)
        data_input = {"data": storage.redact(config.data)}
        if config.base:  # lineage: the merged model will point back to these exact base weights
            manifest.inputs["base"] = storage.hash_any(config.base)
        validated = _run_stage(
            manifest, validate, data_input, data_dir=data_dir, store_root=store.root,
            max_seconds=config.max_seconds, text_extension=config.text_extension, num_workers=config.num_workers,
        )
        manifest.inputs["data"] = validated["data_sha256"]
        if not validated["summary"]["accepted"]:
            raise ValueError(f"no accepted audio in {storage.redact(config.data)}: see {validated['url']}/report.md")
        n = config.normalize
        normalized = _run_stage(
            manifest, normalize, {"data": validated["data_sha256"]}, data_dir=data_dir, store_root=store.root,
            work_dir=str(work_dir), peak=n.peak, loudness=n.loudness, format=n.format.value,
            max_seconds=config.max_seconds, text_extension=config.text_extension, num_workers=config.num_workers,
        )
        if config.codec:
            place = storage.digest_listing({"data": storage.normalize_url(config.data), "speaker": config.speaker or "",
                                            "normalize": storage.canonical_json(n.model_dump(mode="json"))})[:16]
            extract_args = dict(
                normalized_url=normalized["url"], codec=config.codec, store_root=store.root,
                work_dir=str(work_dir / "extract" / place), text_extension=config.text_extension,
                max_seconds=config.max_seconds, num_workers=config.num_workers,
            )
            # GPU step: in this process by default, or as a child run on the GPU pool (cached here,
            # so a rerun with the same inputs launches nothing).
            extract = bind(extract_on_pool if config.gpu_pool else extract_task, store, work_dir)
            tokens = _run_stage(manifest, extract, {"normalize": normalized["key"]}, **extract_args)
            pack = bind(data_tasks.pack_task, store, work_dir)
            packed = _run_stage(manifest, pack, {"extract": tokens["key"]}, codes_dir=tokens["url"], store_root=store.root,
                                text_extension=config.text_extension, num_workers=config.num_workers)
            if config.base:
                init_lora = latest_lora(store, config.project, config.base) if config.warm_start else None
                if init_lora:
                    manifest.inputs["init_lora"] = storage.redact(init_lora)
                # GPU step: in this process by default (resumes its own run folder after a failure,
                # never a blind retry), or the train_flow deployment on the GPU pool.
                train = bind(train_on_pool if config.gpu_pool else train_task, store, work_dir)
                lora = _run_stage(
                    manifest, train, {"pack": packed["key"], "base": manifest.inputs["base"]},
                    pack_url=packed["url"], base=config.base, store_root=store.root, work_dir=str(work_dir),
                    project=config.project, preset=config.preset.value, max_steps=config.max_steps,
                    seed=config.seed, init_lora=init_lora, progress_every=config.progress_every,
                    sampling=config.sampling.value, max_length=config.max_length,
                )
                if not lora["checkpoint"]:
                    raise RuntimeError(f"training published no checkpoint: see {storage.redact(lora['url'])}")
                chosen = lora["checkpoint"]
                if config.evaluate:  # previews decide which checkpoint is merged
                    evaluate = bind(evaluate_task, store, work_dir)
                    scored = _run_stage(manifest, evaluate, {"train": lora["key"]}, train_url=lora["url"], base=config.base,
                                        codec=config.codec, normalized_url=normalized["url"], store_root=store.root,
                                        work_dir=str(work_dir), pack_url=packed["url"],
                                        sentences_per_speaker=config.preview_sentences_per_speaker,
                                        max_new_tokens=config.preview_max_new_tokens, seed=config.seed,
                                        text_extension=config.text_extension, asr=config.asr)
                    chosen = scored["checkpoint"]
                    _plot_artifact(config.project, manifest.stages[-1])
                if config.merge_step is not None:  # the user's choice overrides the recommendation
                    chosen = chosen_checkpoint(lora["checkpoints"], config.merge_step)
                    manifest.inputs["merge_step"] = str(config.merge_step)
                merge = bind(merge_task, store, work_dir)
                merged = _run_stage(manifest, merge, {"checkpoint": chosen, "base": manifest.inputs["base"]},
                                    checkpoint=chosen, base=config.base, store_root=store.root,
                                    work_dir=str(work_dir), project=config.project, train_key=lora["key"])
            else:
                logger.warning("no --base given: stopping after pack (train and merge need a base model)")
        else:
            logger.warning("no --codec given: stopping after normalize (extract, pack and train need it)")
        manifest.status = "completed"
    except BaseException:
        manifest.status = "failed"
        raise
    finally:
        manifest.finished = datetime.now(timezone.utc).isoformat()
        markdown = report_markdown(config, manifest)
        create_markdown_artifact(markdown, key=_artifact_key(config.project), description=f"finetune run {run_id}")
        try:
            written = storage.write_manifest(store, manifest, markdown)
        except Exception as exc:
            if manifest.status != "failed":
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
        "normalized": normalized["url"],
        "recommended_checkpoint": chosen,  # what was merged: the previews' pick with evaluate, else train's
        "merged_model": merged["url"] if merged else None,
    }
