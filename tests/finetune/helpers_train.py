"""Small synthetic training data for the train/merge tests: tiny base + packed shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from fishtune.cli import app

WORDS = "the a quick brown fox jumps over lazy dog hello world voice speech model train".split()


def run_cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def make_speakers(root: Path, speakers: int, sentences: int, seed: int = 0) -> Path:
    """``root/SPKi/NNN.lab`` + ``.npy`` with learnable codes (arithmetic runs mod 32)."""
    rng = np.random.default_rng(seed)
    for s in range(speakers):
        folder = root / f"SPK{s}"
        folder.mkdir(parents=True)
        for i in range(sentences):
            n = int(rng.integers(8, 20))
            (folder / f"{i:03d}.lab").write_text(" ".join(rng.choice(WORDS, 5)))
            codes = (int(rng.integers(0, 16)) + np.arange(n)[None, :] * (1 + np.arange(8)[:, None])) % 32
            np.save(folder / f"{i:03d}.npy", codes.astype(np.int64))
    return root


def make_base_and_data(tmp: Path, speakers: int = 3, sentences: int = 12) -> tuple[Path, Path]:
    base, protos = tmp / "base", tmp / "protos"
    assert run_cli("init-base", base, "--preset", "tiny").exit_code == 0
    make_speakers(tmp / "data", speakers, sentences)
    result = run_cli("pack", "-i", tmp / "data", "-o", protos, "-j", "1")
    assert result.exit_code == 0, result.output
    return base, protos


FAST = ("--batch-size", "2", "--max-length", "128", "--val-fraction", "0.2", "--lr", "1e-3")
