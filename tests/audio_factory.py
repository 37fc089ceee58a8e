"""Real audio files for tests, made with numpy + soundfile (no downloads, no mocks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile


def voiced(seconds: float, sample_rate: int = 16000, seed: int = 0, channels: int = 1, level: float = 0.1) -> np.ndarray:
    """A speech-like signal: a few harmonics with a syllable-rate envelope plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 110 + 40 * rng.random()
    tone = sum(np.sin(2 * np.pi * f0 * k * t + rng.random() * 6.28) / k for k in range(1, 6))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t) ** 2
    signal = level * tone * envelope / 2.3 + 0.003 * rng.standard_normal(t.size)
    if channels > 1:
        signal = np.stack([signal * (1.0 - 0.2 * c) for c in range(channels)], axis=1)
    return signal.astype(np.float64)


def write_clip(path: Path, seconds: float = 1.5, sample_rate: int = 16000, text: str | None = "hello there",
               seed: int = 0, channels: int = 1, subtype: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, voiced(seconds, sample_rate, seed, channels), sample_rate, subtype=subtype)
    if text is not None:
        path.with_suffix(".lab").write_text(text, encoding="utf-8")
    return path


def tree_digest(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes: compare before/after to prove nothing changed."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}
