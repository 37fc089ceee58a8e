"""Benchmark the finetune flow on the demo data: first run, no-change rerun, one-file-changed rerun.

    python bench/flow.py [--repeat 1] [--json OUT]

Runs in Prefect's ephemeral mode (a temporary local server, started once before timing). Prints
the wall time of each run, the first/rerun ratio, and the Prefect overhead of the first run:
(flow wall time - the same stages' compute called directly, without Prefect) / flow wall time.
Today the flow is validate -> normalize; the numbers grow with the stages wired later.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo-data"


def copy_data(dest: Path, repeat: int) -> None:
    for speaker in DEMO.iterdir():
        for r in range(repeat):
            shutil.copytree(speaker, dest / f"{speaker.name}{r}" if repeat > 1 else dest / speaker.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=1, help="copies of each demo speaker")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import soundfile
    from prefect import flow

    from fish_speech_core.normalize import normalize_tree
    from fish_speech_core.validate import validate
    from flows.config import FinetuneConfig
    from flows.finetune import finetune

    @flow
    def warm_up() -> None:  # starts the ephemeral server outside the timed runs
        return None

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        copy_data(tmp / "data", args.repeat)
        for attempt in ("warm-up", "timed"):  # the first pass pays imports and file-cache misses
            started = time.perf_counter()
            validate(tmp / "data", show_progress=False)
            normalize_tree(tmp / "data", tmp / f"direct-{attempt}", show_progress=False)
            direct = time.perf_counter() - started

        warm_up()
        config = FinetuneConfig(data=str(tmp / "data"), storage=str(tmp / "store"), project="bench")
        walls, results = [], []
        for label in ("first", "no-change", "one-file-changed"):
            if label == "one-file-changed":
                clip = next(p for p in sorted((tmp / "data").rglob("*.wav")))
                audio, rate = soundfile.read(clip)
                soundfile.write(clip, audio * 0.5, rate)
            started = time.perf_counter()
            results.append(finetune(config))
            walls.append(time.perf_counter() - started)

    figures = {
        "items": results[0]["stages"][1]["summary"]["files"],
        "direct_compute_s": round(direct, 3),
        "first_s": round(walls[0], 3),
        "no_change_s": round(walls[1], 3),
        "one_file_changed_s": round(walls[2], 3),
        "first_over_no_change": round(walls[0] / walls[1], 2),
        "first_over_one_file_changed": round(walls[0] / walls[2], 2),
        "prefect_overhead_fraction_first": round((walls[0] - direct) / walls[0], 3),
        "stages_no_change": {s["stage"]: "hit" if s["cached"] else "miss" for s in results[1]["stages"]},
        "normalize_one_file_changed": {k: results[2]["stages"][1]["summary"][k] for k in ("written", "skipped")},
    }
    for key, value in figures.items():
        print(f"{key:32s} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
