"""Training-input cases: sample lengths the base cannot attend to, bad sampling modes, broken base configs.

Each fails before the model or the data are loaded, so the cases cost a CLI start each.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np

from fish_speech_core.formats.protos import ShardWriter, make_text_data
from tests.hardening.corpus import Case, Run


_TINY_BASE: list[Path] = []  # made once per process, copied into each case
_TINY_BASE_LOCK = threading.Lock()  # the corpus test builds two cases at once


def _base_and_shards(tmp: Path) -> tuple[Path, Path]:
    """A real tiny base (max_seq_len 512) and a real packed shard of one speaker."""
    with _TINY_BASE_LOCK:
        if not _TINY_BASE:
            from fish_speech_core.lm.config import PRESETS
            from fish_speech_core.lm.init_base import init_base

            folder = Path(tempfile.mkdtemp(prefix="fishtune-corpus-base-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            init_base(folder / "base", PRESETS["tiny"], seed=0)
            _TINY_BASE.append(folder / "base")
    base, shards = tmp / "base", tmp / "protos"
    shutil.copytree(_TINY_BASE[0], base)
    rng = np.random.default_rng(0)
    with ShardWriter(shards) as writer:
        writer.write(make_text_data("anna", [(f"sentence {i}", rng.integers(0, 1000, (8, 30)).tolist()) for i in range(6)]))
    return base, shards


def _train(tmp: Path, *extra: str) -> list[str]:
    """``fishtune train`` on tmp/base and tmp/protos (made by :func:`_base_and_shards`)."""
    return ["train", "--project", "p", "--base", str(tmp / "base"), "--data", str(tmp / "protos"),
            "--results-dir", str(tmp / "results"), "--max-steps", "1", *extra]


def _nothing_written(tmp: Path):
    def check(done) -> str | None:
        return "silent-accept" if (tmp / "results" / "p").exists() else None
    return check


def _length(value: str, *expected: str):
    def build(tmp: Path) -> Run:
        _base_and_shards(tmp)
        return Run(_train(tmp, "--max-length", value), output_has=expected,
                   unchanged=(tmp / "base", tmp / "protos"), check=_nothing_written(tmp), timeout=120)
    return build


def _bad_sampling(tmp: Path) -> Run:
    _base_and_shards(tmp)
    return Run(_train(tmp, "--sampling", "shuffle"), exit_codes=(2,), output_has=("--sampling", "shuffle"),
               unchanged=(tmp / "protos",), check=_nothing_written(tmp), timeout=120)


def _base_config(text: str, *expected: str):
    def build(tmp: Path) -> Run:
        base, _ = _base_and_shards(tmp)
        (base / "config.json").write_text(text)
        return Run(_train(tmp), output_has=("config.json", *expected),
                   unchanged=(base, tmp / "protos"), check=_nothing_written(tmp), timeout=120)
    return build


def _base_without_config(tmp: Path) -> Run:
    base, _ = _base_and_shards(tmp)
    (base / "config.json").unlink()
    return Run(_train(tmp), output_has=("is not a Fish Speech 1.4 checkpoint folder", "config.json"),
               unchanged=(base, tmp / "protos"), check=_nothing_written(tmp), timeout=120)


def _config_with(**change) -> str:
    from fish_speech_core.lm.config import PRESETS

    return json.dumps({**PRESETS["tiny"].to_dict(), **change})


CASES = [
    Case("train", "max-length-over-base-max-seq-len", _length("4096", "--max-length 4096", "max_seq_len 512",
                                                                "--max-length 512 or less")),
    Case("train", "max-length-one-over-base", _length("513", "max_seq_len 512", "--max-length 512 or less")),
    Case("train", "sampling-mode-unknown", _bad_sampling),
    Case("train", "base-config-not-json", _base_config("{not json", "not valid JSON")),
    Case("train", "base-max-seq-len-not-a-number", _base_config(_config_with(max_seq_len="long"),
                                                                 "max_seq_len must be a positive integer")),
    Case("train", "base-max-seq-len-negative", _base_config(_config_with(max_seq_len=-1),
                                                             "max_seq_len must be a positive integer")),
    Case("train", "base-without-config", _base_without_config),
]
