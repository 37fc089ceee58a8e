"""Scorers on real speech (espeak-ng voices) and the checkpoint recommendation."""

import subprocess
from pathlib import Path

import numpy as np
import pytest

from fish_speech_core.audio import read_audio, to_mono
from fish_speech_core.evaluate import ResemblyzerEmbedder, audio_checks, duration_ratio, speaker_similarity
from fish_speech_core.evaluate.asr import word_error_rate
from fish_speech_core.evaluate.previews import recommend_checkpoint, score_previews

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "We also need a small plastic snake and a big toy frog for the kids.",
]


def espeak(path: Path, text: str, voice: str) -> Path:
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True)
    return path


@pytest.fixture(scope="module")
def voices(tmp_path_factory):
    root = tmp_path_factory.mktemp("voices")
    return {
        voice: [espeak(root / f"{voice}-{i}.wav", s, voice) for i, s in enumerate(SENTENCES)]
        for voice in ("en-us", "en-us+f3")
    }


@pytest.fixture(scope="module")
def embedder():
    return ResemblyzerEmbedder()


def load(path):
    audio, rate = read_audio(path)
    return to_mono(audio), rate


def test_same_voice_scores_higher_than_a_different_voice(voices, embedder):
    refs = [load(p) for p in voices["en-us"][:2]]
    same = speaker_similarity(embedder, *load(voices["en-us"][2]), refs)
    other = speaker_similarity(embedder, *load(voices["en-us+f3"][2]), refs)
    assert same > other + 0.1
    assert same > 0.8


def test_embedding_calls_no_librosa(voices, embedder, monkeypatch):
    # librosa's first use compiles numba kernels (4 s idle, up to 100 s on busy cores): the
    # embedder's resampling and mel frontend are torch, Resemblyzer's VAD and LSTM are used as is.
    import resemblyzer.audio

    class NoLibrosa:
        def __getattr__(self, name):
            raise AssertionError(f"the embedder called librosa.{name}")

    monkeypatch.setattr(resemblyzer.audio, "librosa", NoLibrosa())
    emb = embedder.embed(*load(voices["en-us"][0]))
    assert emb.shape == (256,) and abs(float(np.linalg.norm(emb)) - 1.0) < 1e-5


def test_espeak_speech_passes_the_audio_checks(voices):
    audio, rate = load(voices["en-us"][0])
    checks = audio_checks(audio, rate, SENTENCES[0])
    assert checks.ok, checks.problems
    assert 0.5 < checks.duration_ratio < 2.0
    assert checks.clipped_fraction == 0.0


def test_silence_clipping_and_length_are_flagged():
    rate = 16000
    silent = audio_checks(np.zeros(rate * 4), rate, "Four seconds of text here, roughly.")
    assert not silent.ok and silent.silence_fraction == 1.0 and silent.longest_silence_s == 4.0
    loud = audio_checks(np.sign(np.sin(np.arange(rate * 3) / 5.0)), rate, "A sentence of about three seconds.")
    assert loud.clipped_fraction > 0.9 and any("clipped" in p for p in loud.problems)
    assert duration_ratio(10.0, "Short.") > 2.0


def test_score_previews_summary(voices, embedder):
    summary = score_previews(voices["en-us"], SENTENCES, voices["en-us"][:1], embedder)
    other = score_previews(voices["en-us+f3"], SENTENCES, voices["en-us"][:1], embedder)
    assert len(summary["files"]) == 3 and summary["wer"] is None
    assert summary["similarity"] > other["similarity"]
    assert summary["ok_fraction"] == 1.0


def test_an_empty_clip_fails_its_checks_instead_of_the_scoring(voices, embedder, tmp_path):
    import soundfile

    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0), 44100)  # what a model that never emits codes renders
    summary = score_previews([empty, voices["en-us"][1]], SENTENCES[:2], voices["en-us"][:1], embedder)
    first, second = summary["files"]
    assert first["similarity"] is None and first["ok"] is False
    assert "no speech to compare voices" in first["problems"]
    assert second["similarity"] > 0.8 and summary["similarity"] == second["similarity"]
    assert summary["ok_fraction"] == 0.5


def test_pluggable_transcriber_gives_word_error_rate(voices, embedder):
    class Echo:  # stands in for an ASR engine: hears one word wrong
        def transcribe(self, audio, rate):
            return SENTENCES[0].replace("fox", "box")

    summary = score_previews(voices["en-us"][:1], SENTENCES[:1], [], embedder, Echo())
    assert summary["similarity"] is None
    assert summary["wer"] == pytest.approx(1 / 13)
    assert word_error_rate("a b c", "a c") == pytest.approx(1 / 3)


def test_recommend_checkpoint_rules():
    rows = [
        {"step": 300, "val_loss": 2.00, "similarity": 0.86, "ok_fraction": 1.0},
        {"step": 100, "val_loss": 2.50, "similarity": 0.70, "ok_fraction": 1.0},
        {"step": 200, "val_loss": 2.10, "similarity": 0.85, "ok_fraction": 1.0},
        {"step": 400, "val_loss": 1.99, "similarity": 0.90, "ok_fraction": 0.5},
    ]
    pick, rule = recommend_checkpoint(rows)
    assert pick["step"] == 200 and "similarity" in rule  # 400 fails the audio checks
    pick, rule = recommend_checkpoint([{k: v for k, v in r.items() if k in ("step", "val_loss")} for r in rows])
    assert pick["step"] == 300 and "held-out loss" in rule  # 2.00 within 1% of 1.99
    with pytest.raises(ValueError):
        recommend_checkpoint([])
