"""``fishtune init-codec`` and ``fishtune extract`` end to end through the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from fish_speech_core.codec import FireflyConfig, codec_hash, init_codec, load_codec
from fishtune.cli import app

runner = CliRunner()


def test_init_codec_writes_a_loadable_seeded_checkpoint(tmp_path):
    out = tmp_path / "codec.pth"
    result = runner.invoke(app, ["init-codec", str(out), "--preset", "tiny", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "1,265,942 parameters" in result.output  # same size as the fixture small-model.pth
    model = load_codec(out)
    assert model.config == FireflyConfig.from_name("tiny")
    assert codec_hash(model) == codec_hash(init_codec(FireflyConfig.from_name("tiny"), seed=1))
    bad = runner.invoke(app, ["init-codec", str(out), "--preset", "huge"])
    assert bad.exit_code != 0 and "'huge' is not one of 'tiny'," in bad.output and "'fish-speech-1.4'" in bad.output


def test_offline_demo_init_codec_then_extract(tmp_path, reference):
    """No --preset/--config: extract takes the shape stored by init-codec."""
    checkpoint = tmp_path / "codec.pth"
    assert runner.invoke(app, ["init-codec", str(checkpoint), "--preset", "tiny"]).exit_code == 0
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(reference / "firefly" / "c.wav", data / "c.wav")
    (data / "c.lab").write_text("hello")
    result = runner.invoke(app, ["extract", str(data), "--checkpoint-path", str(checkpoint), "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    codes = np.load(data / "c.npy")
    assert codes.dtype == np.int32 and codes.shape == (8, 66150 // 512 // 4)
    assert codes.min() >= 0 and codes.max() < 1000 and len(np.unique(codes)) > 1


def test_extract_cli_matches_reference_and_is_incremental(tmp_path, reference):
    firefly = reference / "firefly"
    data = tmp_path / "data"
    (data / "spk").mkdir(parents=True)
    shutil.copy(firefly / "a.wav", data / "a.wav")
    shutil.copy(firefly / "b.flac", data / "spk" / "B.FLAC")  # suffixes match in any case
    (data / "broken.wav").write_bytes(b"RIFF....")
    (data / "orphan.wav").write_bytes(b"RIFF....")  # no transcript: refused before any decoding
    for lab in ("a.lab", "spk/B.lab", "broken.lab"):
        (data / lab).write_text("some words")
    state = torch.load(firefly / "small-model.pth", weights_only=True)
    checkpoint = tmp_path / "small-generator.pth"
    torch.save({f"generator.{k}": v for k, v in state.items()}, checkpoint)
    args = ["extract", str(data), "--checkpoint-path", str(checkpoint),
            "--config", str(firefly / "small-config.json"), "--num-workers", "0"]

    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Extracted 2 files" in result.output and "rejected 1" in result.output
    assert "broken.wav" in result.output
    assert "orphan.wav: missing-transcript" in result.output and not (data / "orphan.npy").exists()
    assert (data / "a.npy").read_bytes() == (firefly / "expected-codes-alone" / "a.npy").read_bytes()
    np.testing.assert_array_equal(np.load(data / "spk" / "B.npy"), np.load(firefly / "expected-codes-alone" / "b.npy"))

    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "Extracted 0 files" in again.output and "skipped 2 up to date" in again.output


def test_extract_cli_filelist_and_argument_errors(tmp_path, reference):
    firefly = reference / "firefly"
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(firefly / "a.wav", data / "a.wav")
    shutil.copy(firefly / "c.wav", data / "c.wav")
    (data / "a.lab").write_text("first")
    (data / "c.lab").write_text("third")
    checkpoint = firefly / "small-model.pth"
    base = ["extract", str(data), "--checkpoint-path", str(checkpoint), "--num-workers", "0"]

    filelist = tmp_path / "list.txt"
    filelist.write_text("c.wav|SPK|en|hello there\n", encoding="utf-8")
    result = runner.invoke(app, [*base, "--preset", "tiny", "--filelist", str(filelist)])
    assert result.exit_code == 0, result.output
    assert (data / "c.npy").exists() and not (data / "a.npy").exists()

    filelist.write_text("../outside.wav|SPK|en|hi\n", encoding="utf-8")
    escaped = runner.invoke(app, [*base, "--preset", "tiny", "--filelist", str(filelist)])
    assert escaped.exit_code == 1 and "path-escapes-root" in escaped.output  # reported, nothing else to do

    both = runner.invoke(app, [*base, "--preset", "tiny", "--config", str(firefly / "small-config.json")])
    assert both.exit_code == 2 and "not both" in both.output

    wrong = runner.invoke(app, [*base, "--preset", "fish-speech-1.4"])
    assert wrong.exit_code == 2 and "Cannot load codec" in wrong.output and "shape mismatches" in wrong.output
