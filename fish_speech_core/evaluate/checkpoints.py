"""Previews of every checkpoint for every speaker, scored, with a per-checkpoint aggregate.

For each model (the base, and the base + each LoRA checkpoint applied on the fly) and each
speaker plan (:mod:`fish_speech_core.evaluate.selection`): render the speaker's held-out
sentences with the speaker's own prompt clip, score them against that speaker's real clips,
then average over speakers per model. Preview sets are cached by content in ``cache_dir``
(one folder per :func:`~fish_speech_core.evaluate.previews.preview_key`), so an unchanged
model, speaker, prompt and sentence set is never rendered twice, across runs too; their scores
are cached beside them (keyed by the previews' and the reference clips' bytes and the embedder).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fish_speech_core.evaluate.asr import Transcriber
from fish_speech_core.evaluate.previews import (
    cached_previews,
    model_fingerprint,
    preview_key,
    score_previews,
    write_previews,
)
from fish_speech_core.evaluate.selection import SpeakerPlan
from fish_speech_core.evaluate.speaker import SpeakerEmbedder, reference_embedding
from fish_speech_core.files import atomic_write, sha256_file
from fish_speech_core.lm.generate import SamplingSettings


@dataclass(frozen=True)
class Candidate:
    """One model to preview: ``lora`` None is the base model itself (step 0)."""

    name: str
    step: int
    lora: Path | None = None


@dataclass
class Evaluation:
    rows: list[dict]  # one JSON-able row per candidate (aggregate + "speakers"), in candidate order
    files: dict[str, Path] = field(default_factory=dict)  # "<name>/<speaker>/NN.wav" -> rendered wav
    rendered: int = 0  # preview sets (one model x one speaker) rendered now, not taken from the cache
    scored: int = 0  # preview sets scored now, not taken from the cache


SCORES = "scores.json"  # beside a cached preview set: its scores, with the key they were computed under
SCORE_FORMAT = 2  # bump when scoring changes, so cached scores are recomputed


def _scores_key(wavs: Sequence[Path], texts: Sequence[str], references: Sequence[Path], embedder: str,
                transcriber: str | None = None) -> str:
    """Scores depend on the clips' bytes (not only their render key: another device renders other bytes)."""
    parts = {"format": SCORE_FORMAT, "previews": [sha256_file(p) for p in wavs], "texts": list(texts),
             "references": [sha256_file(p) for p in references], "embedder": embedder}
    if transcriber is not None:  # only then: keys of scores without ASR stay what they were
        parts["transcriber"] = transcriber
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _cached_scores(path: Path, key: str) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("scores") if data.get("key") == key else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _score_speaker(plan, wavs, reference, embedder, transcriber) -> dict:
    """One speaker's scores for one model; a clip set that cannot be scored gets none, with the reason."""
    try:
        scored = score_previews(wavs, list(plan.sentences), reference, embedder, transcriber)
        return {"similarity": scored["similarity"], "duration_ratio": scored["duration_ratio"],
                "ok_fraction": scored["ok_fraction"], "wer": scored["wer"], "problem": None,
                "clips": [{k: f[k] for k in ("text", "seconds", "duration_ratio", "similarity", "ok", "problems")}
                          for f in scored["files"]]}
    except (RuntimeError, ValueError) as err:
        return {"similarity": None, "duration_ratio": None, "ok_fraction": 0.0, "wer": None,
                "problem": f"not scored: {err}", "clips": []}


def evaluate_checkpoints(
    model_dir: str | os.PathLike,
    candidates: Sequence[Candidate],
    codec: str | os.PathLike,
    plans: Sequence[SpeakerPlan],
    cache_dir: str | os.PathLike,
    seed: int = 0,
    settings: SamplingSettings = SamplingSettings(),
    max_new_tokens: int = 1024,
    codec_preset_or_config: str | os.PathLike | None = None,
    device: str = "auto",
    embedder: SpeakerEmbedder | None = None,
    transcriber: Transcriber | None = None,
    log: Callable[[str], None] | None = None,
) -> Evaluation:
    """Render and score every speaker's previews with every candidate model.

    Each row: ``name``, ``step``, the aggregate ``similarity`` and ``duration_ratio`` (means
    over the speakers that have one), ``ok_fraction`` (share of all clips passing the checks),
    ``wer`` (with a transcriber), ``previews`` (every clip, relative ``<name>/<speaker>/NN.wav``),
    ``problem``, and ``speakers``: per speaker the same scores, its ``previews``, per-clip
    details and whether the set came from the cache. The model is loaded only when some
    speaker's set is not cached, the embedder (default Resemblyzer) only when some score is not.

    Raises:
        ValueError: no candidates or no speaker plans.
    """
    from fish_speech_core.audio import read_audio, to_mono

    if not candidates or not plans:
        raise ValueError("evaluate_checkpoints needs at least one model and one speaker")
    model_dir, codec, cache_dir = Path(model_dir), Path(codec), Path(cache_dir)
    from fish_speech_core.evaluate.speaker import ResemblyzerEmbedder

    kind = type(embedder) if embedder is not None else ResemblyzerEmbedder
    embedder_id = f"{kind.__module__}.{kind.__qualname__}"
    # the engine's class names it in the score key (with or without ASR, scores of one set are cached apart)
    transcriber_id = None if transcriber is None else f"{type(transcriber).__module__}.{type(transcriber).__qualname__}"
    loaded: dict[str, object] = {} if embedder is None else {"embedder": embedder}
    references: dict[str, np.ndarray] = {}
    prompt_codes: dict[Path, object] = {}  # prompt audio -> its codec codes (K, n)

    def scorer() -> SpeakerEmbedder:
        """The embedder, loaded only when some score is not cached (Resemblyzer's import is slow)."""
        if "embedder" not in loaded:
            loaded["embedder"] = ResemblyzerEmbedder()
        return loaded["embedder"]

    def reference(plan: SpeakerPlan) -> np.ndarray:
        """Each speaker's real clips embedded once (and only when some score is not cached)."""
        if plan.speaker not in references:
            clips = [(to_mono(a), rate) for a, rate in (read_audio(p) for p in plan.references)]
            references[plan.speaker] = reference_embedding(scorer(), clips)
        return references[plan.speaker]

    base_print = model_fingerprint(model_dir, None, codec)  # the big model.pth is hashed once
    evaluation = Evaluation(rows=[])
    for candidate in candidates:
        fingerprint = {**base_print, "lora": sha256_file(candidate.lora) if candidate.lora is not None else None}
        synth = None
        speakers = []
        for plan in plans:
            key = preview_key(fingerprint, plan.sentences, plan.prompt.audio, plan.prompt.text, seed, settings,
                              max_new_tokens, plan.speaker)
            out = cache_dir / key[:32]
            wavs = cached_previews(out, key)
            cached = wavs is not None
            if wavs is None:
                from fish_speech_core.synthesis import encode_reference, load_synthesizer

                if synth is None:  # the codec and the prompts' codes are the same for every candidate
                    synth = load_synthesizer(model_dir, codec, codec_preset_or_config, candidate.lora, device,
                                             codec=loaded.get("codec"))
                    loaded["codec"] = synth.codec
                if plan.prompt.audio not in prompt_codes:
                    prompt_codes[plan.prompt.audio] = encode_reference(synth, plan.prompt.audio)
                info = {"model": candidate.name, "lora": str(candidate.lora) if candidate.lora else None,
                        "speaker": plan.speaker, "prompt": str(plan.prompt.audio)}
                wavs = write_previews(synth, plan.sentences, prompt_codes[plan.prompt.audio],
                                      plan.prompt.text, out, key, seed, settings, max_new_tokens, info)
                evaluation.rendered += 1
            relative = [f"{candidate.name}/{plan.speaker}/{Path(w).name}" for w in wavs]
            evaluation.files |= dict(zip(relative, map(Path, wavs)))
            score_key = _scores_key(wavs, plan.sentences, plan.references, embedder_id, transcriber_id)
            scores = _cached_scores(out / SCORES, score_key)
            if scores is None:
                scores = _score_speaker(plan, wavs, reference(plan), scorer(), transcriber)
                evaluation.scored += 1
                with atomic_write(out / SCORES, "w") as handle:
                    json.dump({"key": score_key, "scores": scores}, handle, indent=2)
            speakers.append({"speaker": plan.speaker, **scores, "previews": relative, "cached": cached})
        del synth
        clips = sum(len(s["previews"]) for s in speakers)
        ok = sum(s["ok_fraction"] * len(s["previews"]) for s in speakers)
        problems = [f"{s['speaker']}: {s['problem']}" for s in speakers if s["problem"]]
        row = {
            "name": candidate.name, "step": candidate.step,
            "similarity": _mean(s["similarity"] for s in speakers),
            "duration_ratio": _mean(s["duration_ratio"] for s in speakers),
            "ok_fraction": ok / clips if clips else 0.0,
            "wer": _mean(s["wer"] for s in speakers),
            "previews": [p for s in speakers for p in s["previews"]],
            "problem": "; ".join(problems) or None,
            "speakers": speakers,
        }
        evaluation.rows.append(row)
        if log is not None:
            fresh = sum(not s["cached"] for s in speakers)
            log(f"previews of {candidate.name}: {fresh} speaker(s) rendered, {len(speakers) - fresh} from cache")
    return evaluation
