"""Path and storage cases: symlinks out of the root, outputs inside inputs, credentials in URLs."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq

from tests.audio_factory import write_clip
from tests.hardening.corpus import Case, Run


def _speaker_link_out_of_root(tmp: Path) -> Run:
    data, outside = tmp / "data", tmp / "outside"
    write_clip(data / "anna" / "a.wav")
    write_clip(outside / "secret.wav", seed=3)
    os.symlink(outside, data / "eve")
    report = tmp / "manifest.parquet"

    def check(done) -> str | None:
        rows = {r["path"]: (r["status"], r["reason"]) for r in pq.read_table(report).to_pylist()}
        if any(status == "accepted" and not path.startswith("anna/") for path, (status, _) in rows.items()):
            return "escape"
        return None

    return Run(["validate", str(data), "--report", str(report)], exit_codes=(0,), output_has=("path-escapes-root",),
               unchanged=(data, outside), check=check)


CASES = [
    Case("paths", "validate-speaker-symlink-out-of-root", _speaker_link_out_of_root),
]
