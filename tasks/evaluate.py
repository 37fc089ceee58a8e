"""Thin Prefect task for the evaluation: previews of the base and each kept checkpoint, scored per
speaker and per checkpoint (:mod:`fish_speech_core.evaluate.run`), published with a plot."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from fish_speech_core import storage
from fish_speech_core.storage import local_file, local_tree
from fishtune.tasks.params import EvaluateParams
from fishtune.tasks.runtime import work_folder
from fishtune.tasks.stage import Stage, run_logger

EVALUATE = Stage("evaluate", {"train": "train_url", "base": "base", "codec": "codec",
                              "normalized": "normalized_url", "pack": "pack_url"}, summary_file="scores.json")


@task(name="evaluate", cache_policy=EVALUATE.cache_policy, persist_result=True)
def evaluate_task(train_url: str, base: str, codec: str, normalized_url: str, store_root: str,
                  pack_url: str | None = None, params: EvaluateParams = EvaluateParams(),
                  work_dir: str | None = None) -> dict:
    """Publish ``evaluate/<key>/<base|step_N>/<speaker>/NN.wav`` + ``prompts/<speaker>/<clip>`` +
    ``scores.json`` + ``plot.png``; return the checkpoint the previews recommend (its URL in the
    train artifact)."""
    logger = run_logger("fishtune.evaluate")

    def compute(tmp: Path):
        from fish_speech_core.evaluate.plot import plot_checkpoints
        from fish_speech_core.evaluate.run import evaluate_run

        work = work_folder(store_root, work_dir)
        made = evaluate_run(
            local_tree(train_url, work / "inputs"), local_tree(base, work / "inputs"), local_file(codec, work / "inputs"),
            local_tree(normalized_url, work / "inputs"), work / "evaluate" / "previews",
            local_tree(pack_url, work / "inputs") if pack_url else None,
            sentences_per_speaker=params.sentences_per_speaker, max_new_tokens=params.max_new_tokens,
            seed=params.seed, max_references=params.max_references, text_extension=params.text_extension,
            asr=params.asr, log=logger.info, warn=logger.warning,
        )
        # Paths in the summary ("previews", "prompt", "plot") are relative to the artifact: the report links them.
        files = {**made.files, "plot.png": plot_checkpoints(made.summary["rows"], tmp / "plot.png")}
        checkpoint = storage.join(train_url, "checkpoints", f"{made.checkpoint_name}.ckpt")
        return files, {"checkpoint": checkpoint, "rendered": made.rendered, "scored": made.scored,
                       "summary": {**made.summary, "plot": "plot.png"}}

    args = {"train_url": train_url, "base": base, "codec": codec, "normalized_url": normalized_url,
            "pack_url": pack_url, "params": params}
    done = EVALUATE.run(store_root, args, compute)
    scores = done.summary
    counts = {"rendered": 0, "scored": 0} if done.reused else {"rendered": scores["rendered"], "scored": scores["scored"]}
    return done.result({**scores["summary"], **counts}, checkpoint=scores["checkpoint"])
