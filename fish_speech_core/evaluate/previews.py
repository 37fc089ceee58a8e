"""Preview audio per checkpoint, its scores, and a checkpoint recommendation.

* :func:`render_previews`: speak sentences with one checkpoint (base, merged, or base + LoRA on
  the fly) in a reference voice; cached by content (:func:`preview_key`, :func:`cached_previews`,
  :func:`write_previews` are the parts :mod:`fish_speech_core.evaluate.checkpoints` reuses to
  render every speaker of every checkpoint).
* :func:`score_previews`: speaker similarity to real clips, duration/silence/clipping checks,
  optional ASR word error rate.
* :func:`recommend_checkpoint`: pick the earliest good checkpoint and say which rule chose it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fish_speech_core.evaluate.asr import Transcriber, word_error_rate
from fish_speech_core.evaluate.checks import audio_checks
from fish_speech_core.evaluate.speaker import SpeakerEmbedder, reference_embedding, speaker_similarity
from fish_speech_core.files import atomic_write, sha256_file
from fish_speech_core.lm.generate import SamplingSettings

MANIFEST = "previews.json"
# Bump when rendering or the key changes, so cached previews are redone.
# 2: the key names the speaker; previews are rendered per speaker with that speaker's prompt clip.
PREVIEW_FORMAT = 2
MODEL_FILES = ("config.json", "model.pth", "tokenizer.json")


def model_fingerprint(
    model_dir: str | os.PathLike, lora_ckpt: str | os.PathLike | None, codec: str | os.PathLike
) -> dict:
    """Content hashes of what renders the previews (hash once, reuse for every speaker)."""
    model_dir = Path(model_dir)
    return {
        "model": {name: sha256_file(model_dir / name) for name in MODEL_FILES},
        "lora": sha256_file(lora_ckpt) if lora_ckpt is not None else None,
        "codec": sha256_file(codec),
    }


def preview_key(
    fingerprint: Mapping, sentences: Sequence[str], prompt_audio: str | os.PathLike | None,
    prompt_text: str | None, seed: int, settings: SamplingSettings, max_new_tokens: int,
    speaker: str | None = None,
) -> str:
    """The content key of one preview set: model + adapter + codec hashes, speaker, prompt clip
    bytes and text, sentences, seed and sampling settings."""
    parts = {
        "format": PREVIEW_FORMAT,
        **fingerprint,
        "speaker": speaker,
        "sentences": list(sentences),
        "prompt_audio": sha256_file(prompt_audio) if prompt_audio is not None else None,
        "prompt_text": prompt_text,
        "seed": seed,
        "settings": [settings.temperature, settings.top_p, settings.repetition_penalty],
        "max_new_tokens": max_new_tokens,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cached_previews(out_dir: str | os.PathLike, key: str) -> list[Path] | None:
    """The wavs in ``out_dir`` when its ``previews.json`` records ``key`` and every wav hashes as written."""
    out_dir = Path(out_dir)
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("key") != key:
        return None
    paths = [out_dir / item["file"] for item in data["files"]]
    for path, item in zip(paths, data["files"]):
        if not path.is_file() or sha256_file(path) != item["sha256"]:
            return None
    return paths


def write_previews(
    synth, sentences: Sequence[str], prompt_codes, prompt_text: str | None, out_dir: str | os.PathLike,
    key: str, seed: int = 0, settings: SamplingSettings = SamplingSettings(), max_new_tokens: int = 1024,
    info: Mapping | None = None,
) -> list[Path]:
    """Render with a loaded ``Synthesizer``: ``out_dir/NN.wav`` per sentence (seed ``seed + i``),
    then ``previews.json`` (written last: it marks the set complete)."""
    from fish_speech_core.synthesis import synthesize, write_wav

    out_dir = Path(out_dir)
    files, paths = [], []
    for i, sentence in enumerate(sentences):
        result = synthesize(
            synth, sentence, prompt_codes, prompt_text if prompt_codes is not None else None,
            settings, max_new_tokens, seed + i,
        )
        path = write_wav(out_dir / f"{i:02d}.wav", result.audio, result.sample_rate)
        paths.append(path)
        files.append({
            "file": path.name, "text": sentence, "sha256": sha256_file(path),
            "seconds": result.audio.numel() / result.sample_rate,
            "new_tokens": result.new_tokens, "tokens_per_second": result.tokens_per_second,
        })
    manifest = {"key": key, **(info or {}), "seed": seed, "files": files}
    with atomic_write(out_dir / MANIFEST, "w") as handle:
        json.dump(manifest, handle, indent=2)
    return paths


def render_previews(
    model_dir: str | os.PathLike,
    lora_ckpt: str | os.PathLike | None,
    codec: str | os.PathLike,
    sentences: Sequence[str],
    prompt_audio: str | os.PathLike | None,
    prompt_text: str | None,
    out_dir: str | os.PathLike,
    seed: int = 0,
    settings: SamplingSettings = SamplingSettings(),
    max_new_tokens: int = 1024,
    codec_preset_or_config: str | os.PathLike | None = None,
    device: str = "auto",
    speaker: str | None = None,
) -> list[Path]:
    """Render ``sentences`` to ``out_dir/NN.wav`` (one per sentence) and write ``previews.json``.

    Cached by content: when ``previews.json`` records the same key (:func:`preview_key`: hashes
    of the model files, adapter, codec and prompt clip, plus speaker, sentences, prompt text,
    seed and settings) and every wav still hashes as written, nothing is rendered again.
    Sentence i uses seed ``seed + i``.
    """
    from fish_speech_core.synthesis import encode_reference, load_synthesizer

    model_dir, codec, out_dir = Path(model_dir), Path(codec), Path(out_dir)
    lora = Path(lora_ckpt) if lora_ckpt is not None else None
    prompt = Path(prompt_audio) if prompt_audio is not None else None
    if not sentences:
        raise ValueError("no sentences to render")
    key = preview_key(model_fingerprint(model_dir, lora, codec), sentences, prompt, prompt_text, seed, settings,
                      max_new_tokens, speaker)
    cached = cached_previews(out_dir, key)
    if cached is not None:
        return cached
    synth = load_synthesizer(model_dir, codec, codec_preset_or_config, lora, device)
    prompt_codes = encode_reference(synth, prompt) if prompt is not None else None
    info = {"model_dir": str(model_dir), "lora": str(lora) if lora else None, "speaker": speaker}
    return write_previews(synth, sentences, prompt_codes, prompt_text, out_dir, key, seed, settings,
                          max_new_tokens, info)


def _read(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    from fish_speech_core.audio import read_audio, to_mono

    audio, rate = read_audio(path)
    return to_mono(audio), rate


MIN_SIMILARITY_SECONDS = 0.5  # the voice encoder needs at least a few of its 1.6 s windows' worth


def score_previews(
    previews: Sequence[str | os.PathLike],
    texts: Sequence[str],
    reference_clips: Sequence[str | os.PathLike] | np.ndarray,
    embedder: SpeakerEmbedder | None = None,
    transcriber: Transcriber | None = None,
) -> dict:
    """Score rendered clips against what they should say and the speaker's real clips.

    ``reference_clips``: paths of the speaker's real clips, or their precomputed
    :func:`~fish_speech_core.evaluate.speaker.reference_embedding`. Returns ``{"files": [per-clip
    dict], "similarity", "duration_ratio", "ok_fraction", "wer"}`` (means over clips; ``wer`` is
    None without a transcriber). Small and JSON-able.
    """
    if len(previews) != len(texts):
        raise ValueError("one text per preview clip is needed")
    if embedder is None:
        from fish_speech_core.evaluate.speaker import ResemblyzerEmbedder

        embedder = ResemblyzerEmbedder()
    if isinstance(reference_clips, np.ndarray):
        references = reference_clips
    else:  # embedded once, below, when a clip has speech to compare
        references = [_read(p) for p in reference_clips] or None
    rows = []
    for path, text in zip(previews, texts):
        audio, rate = _read(path)
        checks = audio_checks(audio, rate, text)
        row = {"file": str(path), "text": text, **checks.as_dict()}
        row["problems"] = list(checks.problems)
        # An empty or all-silent clip (a model that never emits codes) has no voice to compare:
        # it fails its checks and gets no similarity, instead of failing the whole scoring.
        speech = audio.size >= rate * MIN_SIMILARITY_SECONDS and checks.silence_fraction < 0.99
        if not speech:
            row["ok"] = False
            row["problems"].append("no speech to compare voices")
        if references is not None and speech and not isinstance(references, np.ndarray):
            references = reference_embedding(embedder, references)
        row["similarity"] = speaker_similarity(embedder, audio, rate, references) if references is not None and speech else None
        if transcriber is not None:
            hypothesis = transcriber.transcribe(audio, rate)
            row["transcript"] = hypothesis
            row["wer"] = word_error_rate(text, hypothesis)
        rows.append(row)

    def mean(name: str) -> float | None:
        values = [r[name] for r in rows if r.get(name) is not None]
        return float(np.mean(values)) if values else None

    return {
        "files": rows,
        "similarity": mean("similarity"),
        "duration_ratio": mean("duration_ratio"),
        "ok_fraction": float(np.mean([r["ok"] for r in rows])) if rows else 0.0,
        "wer": mean("wer"),
    }


def recommend_checkpoint(
    rows: Sequence[Mapping],
    similarity_margin: float = 0.02,
    loss_margin: float = 0.01,
) -> tuple[Mapping, str]:
    """Pick the earliest good checkpoint; returns (row, the rule that chose it).

    ``rows``: one mapping per checkpoint with ``step`` and any of ``val_loss``,
    ``similarity``, ``ok_fraction``. Rule: keep checkpoints whose previews all pass the
    sanity checks (when scored); with similarities, take the earliest within
    ``similarity_margin`` of the best; otherwise the earliest whose held-out loss is within
    ``loss_margin`` (relative) of the best; otherwise the last.
    """
    if not rows:
        raise ValueError("no checkpoints to choose from")
    ordered = sorted(rows, key=lambda r: r["step"])
    sane = [r for r in ordered if r.get("ok_fraction") is None or r["ok_fraction"] >= 1.0]
    pool = sane or ordered
    note = "" if sane else " (no checkpoint passed every audio check; all considered)"
    scored = [r for r in pool if r.get("similarity") is not None]
    if scored:
        best = max(r["similarity"] for r in scored)
        pick = next(r for r in scored if r["similarity"] >= best - similarity_margin)
        return pick, (
            f"earliest checkpoint whose speaker similarity ({pick['similarity']:.3f}) is within "
            f"{similarity_margin} of the best ({best:.3f}){note}"
        )
    losses = [r for r in pool if r.get("val_loss") is not None]
    if losses:
        best = min(r["val_loss"] for r in losses)
        pick = next(r for r in losses if r["val_loss"] <= best * (1 + loss_margin))
        return pick, (
            f"earliest checkpoint whose held-out loss ({pick['val_loss']:.4f}) is within "
            f"{loss_margin:.0%} of the best ({best:.4f}){note}"
        )
    return pool[-1], f"no scores: the last checkpoint{note}"
