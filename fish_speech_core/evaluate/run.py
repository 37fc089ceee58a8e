"""One evaluation of a training run: plan every speaker's previews, render and score them for the
base and each kept checkpoint, and pick the checkpoint to merge.

The orchestration layer resolves the inputs to local folders and publishes what this returns.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fish_speech_core.defaults import TEXT_EXTENSION
from fish_speech_core.finetune.steps import checkpoint_step


@dataclass
class RunEvaluation:
    """What an evaluation made: the files to publish (relative path -> local file), the summary and the pick."""

    files: dict[str, Path]
    summary: dict
    checkpoint_name: str  # the pick, e.g. step_000000010 (never the base)
    rendered: int = 0
    scored: int = 0


def evaluate_run(
    trained: str | os.PathLike,
    base: str | os.PathLike,
    codec: str | os.PathLike,
    normalized: str | os.PathLike,
    previews_dir: str | os.PathLike,
    shards: str | os.PathLike | None = None,
    *,
    sentences_per_speaker: int = 3,
    max_new_tokens: int = 1024,
    seed: int = 0,
    max_references: int = 8,
    text_extension: str = TEXT_EXTENSION,
    asr: str | None = None,
    log: Callable[[str], None] = lambda message: None,
    warn: Callable[[str], None] | None = None,
) -> RunEvaluation:
    """Previews of the base and each kept checkpoint of ``trained`` for every speaker of ``normalized``.

    Per speaker (:mod:`fish_speech_core.evaluate.selection`): prompt = one of its real clips,
    ``sentences_per_speaker`` held-out sentences (the trainer's validation split of ``shards``
    when given, else other clips' transcripts), similarity against its other clips. Previews are
    cached by content under ``previews_dir``. Files: ``<base|step_N>/<speaker>/NN.wav`` and
    ``prompts/<speaker>/<clip>``; the summary's paths are relative to them.

    Raises:
        ValueError: no normalized audio with transcripts.
    """
    from fish_speech_core.evaluate.checkpoints import Candidate, evaluate_checkpoints
    from fish_speech_core.evaluate.previews import recommend_checkpoint
    from fish_speech_core.evaluate.selection import held_out_texts, plan_previews, speaker_clips

    trained, normalized = Path(trained), Path(normalized)
    clips = speaker_clips(normalized, text_extension)
    if not clips:
        raise ValueError(f"no normalized audio with transcripts in {normalized} to preview voices with")
    held = None
    train_config = trained / "config.json"
    if shards is not None and train_config.is_file():  # the trainer's own validation split, recomputed from the shards
        val_fraction = json.loads(train_config.read_text()).get("val_fraction")
        if val_fraction:
            held = held_out_texts(Path(shards), float(val_fraction)) or None
    plans = plan_previews(clips, sentences_per_speaker, held, max_references)
    for plan in plans:
        log(f"speaker {plan.speaker}: prompt {plan.prompt.audio.name}, {len(plan.sentences)} sentence(s) "
            f"from {plan.source}" + (f" ({plan.note})" if plan.note else ""))
    history = {r["step"]: r for r in json.loads((trained / "history.json").read_text())}
    candidates = [Candidate("base", 0)] + [
        Candidate(p.stem, checkpoint_step(p), p) for p in sorted((trained / "checkpoints").glob("step_*.ckpt"))]
    transcriber = None
    if asr:
        from fish_speech_core.evaluate.asr import load_transcriber

        transcriber = load_transcriber(asr)
    evaluation = evaluate_checkpoints(base, candidates, codec, plans, previews_dir, seed=seed,
                                      max_new_tokens=max_new_tokens, transcriber=transcriber, log=log)
    rows = [{**r, "val_loss": history.get(r["step"], {}).get("val_loss")} for r in evaluation.rows]
    for row in rows:
        if row["problem"]:
            (warn or log)(f"previews of {row['name']}: {row['problem']}")
    pick, rule = recommend_checkpoint([r for r in rows if r["name"] != "base"])
    files = dict(evaluation.files)
    speakers = []
    for plan in plans:
        prompt = f"prompts/{plan.speaker}/{plan.prompt.audio.name}"
        files[prompt] = plan.prompt.audio
        speakers.append({"speaker": plan.speaker, "prompt": prompt, "prompt_text": plan.prompt.text,
                         "sentences": list(plan.sentences), "source": plan.source, "note": plan.note,
                         "references": len(plan.references)})
    summary = {"rows": rows, "speakers": speakers, "recommended_step": pick["step"], "rule": rule}
    return RunEvaluation(files, summary, pick["name"], evaluation.rendered, evaluation.scored)
