"""Uninterrupted runs of the data stages on the demo data, shared by the fault tests: what a
rerun after a fault must reproduce byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fish_speech_core.codec import load_codec
from fish_speech_core.codec.extract import ExtractSettings, extract
from fish_speech_core.normalize import normalize_tree
from tests.faults.helpers import AUDIO, DEMO
from tests.finetune.helpers_train import run_cli


@pytest.fixture(scope="session")
def tiny_codec(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("codec") / "codec-tiny.pth"
    result = run_cli("init-codec", path, "--preset", "tiny", "--seed", "0")
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="session")
def demo_codes(tmp_path_factory, tiny_codec) -> Path:
    """The demo data with every clip's codes (+ sidecar) from one uninterrupted extraction."""
    root = shutil.copytree(DEMO, tmp_path_factory.mktemp("codes") / "demo")
    audio = sorted(p for p in root.rglob("*") if p.suffix in AUDIO)
    summary = extract(load_codec(tiny_codec), audio, ExtractSettings(num_workers=0, batch_size=4))
    assert summary.count("extracted") == len(audio)
    return root


@pytest.fixture(scope="session")
def demo_normalized(tmp_path_factory) -> Path:
    """``fishtune normalize`` of the demo data, uninterrupted."""
    out = tmp_path_factory.mktemp("normalized") / "demo"
    report = normalize_tree(DEMO, out, num_workers=1, show_progress=False)
    assert report.count("written") == sum(1 for p in DEMO.rglob("*") if p.suffix in AUDIO)
    return out
