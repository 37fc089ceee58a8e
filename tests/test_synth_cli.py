"""``fishtune synthesize`` / ``fishtune decode`` and text chunking, on tiny offline models."""

import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from fish_speech_core.codec import init_codec, save_codec
from fish_speech_core.codec.config import FireflyConfig
from fish_speech_core.lm import load_pretrained, save_pretrained
from fish_speech_core.lm.config import DualARConfig
from fish_speech_core.lm.init_base import init_base
from fish_speech_core.synthesis import split_text
from fishtune.cli import app

runner = CliRunner()


def make_speaking_tiny(folder: Path) -> Path:
    """A random tiny LM nudged to emit <|semantic|> and then <|im_end|> (like the fixtures'
    edited model): embeddings + 0.1, output row <|semantic|> + 0.1, row <|im_end|> + 0.04."""
    init_base(folder / "base", DualARConfig.from_name("tiny"), seed=0)
    loaded = load_pretrained(folder / "base", dtype=torch.float32)
    model, tok = loaded.model, loaded.tokenizer
    with torch.no_grad():
        model.embeddings.weight += 0.1
        model.output.weight[tok.semantic_id] += 0.1
        model.output.weight[tok.im_end_id] += 0.04
    save_pretrained(model, folder / "lm", tok)
    return folder / "lm"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth-models")
    lm = make_speaking_tiny(root)
    codec = root / "codec.pth"
    save_codec(init_codec(FireflyConfig.from_name("tiny"), seed=0), codec)
    return lm, codec


def espeak(path: Path, text: str, voice: str = "en-us") -> Path:
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True)
    return path


def test_split_text_packs_sentences_into_chunks():
    text = "One two. Three four five! Six? " + "word " * 40
    chunks = split_text(text, chunk_chars=28)
    assert chunks[0] == "One two. Three four five!"
    assert chunks[1] == "Six?"
    assert all(len(c) <= 28 for c in chunks)
    assert " ".join(chunks).split() == text.split()
    assert split_text("   ") == []
    assert split_text("Short.", 150) == ["Short."]


@pytest.mark.slow
def test_synthesize_same_seed_gives_identical_wav_bytes(models, tmp_path):
    lm, codec = models
    prompt = espeak(tmp_path / "prompt.wav", "This is my voice.")
    base = ["synthesize", "--model", str(lm), "--codec", str(codec), "--max-new-tokens", "48",
            "--text", "Hello there. This is a test of the synthesizer.", "--device", "cpu",
            "--chunk-chars", "20",  # 3 chunks, each with the previous one as context
            "--prompt-audio", str(prompt), "--prompt-text", "This is my voice."]
    outs = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        result = runner.invoke(app, [*base, "--seed", seed, "--output", str(tmp_path / f"{name}.wav")])
        assert result.exit_code == 0, result.output
        assert "tokens/s" in result.output and "from 3 chunk(s)" in result.output
        outs.append((tmp_path / f"{name}.wav").read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]
    audio, rate = sf.read(tmp_path / "a.wav")
    assert rate == 44100 and audio.ndim == 1 and audio.size > 0 and audio.size % 2048 == 0
    import torch

    assert torch.is_grad_enabled()  # the in-process command gives autograd back (later training needs it)


def test_synthesize_user_errors_are_clear(models, tmp_path):
    lm, codec = models
    result = runner.invoke(app, ["synthesize", "--model", str(lm), "--codec", str(codec),
                                 "--text", "Hi.", "--prompt-text", "x", "-o", str(tmp_path / "o.wav")])
    assert result.exit_code == 2
    assert "--prompt-audio and --prompt-text go together" in result.output
    assert not (tmp_path / "o.wav").exists()


def test_decode_cli_writes_the_reference_audio(reference, tmp_path):
    firefly = reference / "firefly"
    out = tmp_path / "a.wav"
    result = runner.invoke(app, ["decode", str(firefly / "expected-codes-alone" / "a.npy"),
                                 "--checkpoint-path", str(firefly / "small-model.pth"),
                                 "--config", str(firefly / "small-config.json"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    audio, rate = sf.read(out, dtype="float32")
    want = np.load(reference / "decode" / "a-audio.npy")
    assert rate == 44100 and audio.shape == want.shape
    np.testing.assert_allclose(audio, want, atol=1 / 32768 + 1e-6, rtol=0)  # 16-bit PCM


def test_decode_cli_rejects_bad_codes(reference, tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.full((8, 4), 5000, dtype=np.int32))
    firefly = reference / "firefly"
    result = runner.invoke(app, ["decode", str(bad), "--checkpoint-path", str(firefly / "small-model.pth"),
                                 "--config", str(firefly / "small-config.json"), "-o", str(tmp_path / "x.wav")])
    assert result.exit_code == 2
    assert "values in" in result.output


def test_help_texts():
    for command in ("synthesize", "decode"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0
    text = runner.invoke(app, ["synthesize", "--help"]).output
    for flag in ("--prompt-audio", "--lora", "--seed", "--top-p", "--repetition-penalty", "--device"):
        assert flag in text
