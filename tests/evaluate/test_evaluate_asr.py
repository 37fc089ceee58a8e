"""The optional ASR score: a real offline engine (PocketSphinx, model inside its wheel) on espeak-ng speech."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import soundfile as sf

from fish_speech_core.evaluate.asr import AsrConfigError, PocketSphinx, load_transcriber, word_error_rate

SAID = "hello world this is a test of the speech recognizer"
OTHER = "seven purple elephants carried my grandmother across the river"


@pytest.fixture(scope="module")
def spoken(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("asr") / "said.wav"
    subprocess.run(["espeak-ng", "-v", "en-us+m3", "-s", "140", "-w", str(path), SAID], check=True)
    return path


def test_pocketsphinx_hears_what_was_said_better_than_another_sentence(spoken):
    audio, rate = sf.read(spoken, dtype="float32")
    engine = load_transcriber("pocketsphinx")
    heard = engine.transcribe(audio, rate)
    assert heard == engine.transcribe(audio, rate)  # deterministic
    right, wrong = word_error_rate(SAID, heard), word_error_rate(OTHER, heard)
    print(f"heard {heard!r}: WER {right:.2f} vs {wrong:.2f} for another sentence")
    assert right < 0.8 and right < wrong
    assert engine.transcribe(audio[: rate // 10] * 0, rate).strip() == ""  # silence is no words


def test_engine_specs(tmp_path):
    assert isinstance(load_transcriber("fish_speech_core.evaluate.asr:PocketSphinx"), PocketSphinx)
    with pytest.raises(AsrConfigError, match="use one of .*pocketsphinx.* or 'package.module:factory'"):
        load_transcriber("whisper")
    with pytest.raises(AsrConfigError, match="cannot be imported .*is its package installed"):
        load_transcriber("no_such_asr_package:Engine")
    with pytest.raises(AsrConfigError, match="returned object, which has no transcribe"):
        load_transcriber("builtins:object")


def test_word_error_rate_counts_edits_over_reference_words():
    assert word_error_rate("the cat sat", "the cat sat") == 0.0
    assert word_error_rate("the cat sat", "the dog sat down") == pytest.approx(2 / 3)
    assert word_error_rate("", "") == 0.0 and word_error_rate("", "x") == 1.0
