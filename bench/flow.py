"""Benchmark the finetune flow on the demo data: first run, no-change rerun, one-file-changed rerun.

    python bench/flow.py [--repeat 1] [--no-codec] [--json OUT]
    python bench/flow.py --demo [--json OUT]

``--demo`` times ``fishtune demo`` itself as a user runs it (a fresh process each time:
interpreter, imports, tiny models, the ephemeral server, all stages incl. train and evaluate):
the first run into an empty folder, then the unchanged rerun, and the rerun/first ratio
(issue 17: first <= 45 s on 2 quiet cores, rerun <= 10 % of it), with each run's stage seconds.

Runs in Prefect's ephemeral mode (a temporary local server, started once before timing). Prints
the wall time of each run, the first/rerun ratios, and the Prefect overhead of the first run:
(flow wall time - the sum of the stages' wall times) / flow wall time.
The flow is validate -> normalize -> extract -> pack (extract with a random tiny codec made on
the fly; --no-codec stops after normalize). Train and merge join when they land.
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
    parser.add_argument("--no-codec", action="store_true", help="stop after normalize (no extract/pack)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--demo", action="store_true", help="time `fishtune demo`: first run and unchanged rerun")
    args = parser.parse_args()
    if args.demo:
        return demo(args.json)

    import soundfile
    from prefect import flow

    from fishtune.flows.config import FinetuneConfig
    from fishtune.flows.finetune import finetune

    @flow
    def warm_up() -> None:  # starts the ephemeral server outside the timed runs
        return None

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        copy_data(tmp / "data", args.repeat)
        codec = None
        if not args.no_codec:
            from fish_speech_core.codec import init_codec, save_codec
            from fish_speech_core.codec.config import FireflyConfig

            codec = tmp / "codec-tiny.pth"
            save_codec(init_codec(FireflyConfig.from_name("tiny"), seed=0), codec)
        warm_up()
        config = FinetuneConfig(data=str(tmp / "data"), storage=str(tmp / "store"), project="bench",
                                codec=str(codec) if codec else None)
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
        "first_s": round(walls[0], 3),
        "no_change_s": round(walls[1], 3),
        "one_file_changed_s": round(walls[2], 3),
        "first_over_no_change": round(walls[0] / walls[1], 2),
        "first_over_one_file_changed": round(walls[0] / walls[2], 2),
        # the issue's definition: flow wall time minus the stages' own wall times, as a fraction
        "prefect_overhead_fraction_first": round((walls[0] - sum(s["seconds"] for s in results[0]["stages"])) / walls[0], 3),
        "stages_no_change": {s["stage"]: "hit" if s["cached"] else "miss" for s in results[1]["stages"]},
        "normalize_one_file_changed": {k: results[2]["stages"][1]["summary"][k] for k in ("written", "skipped")},
        "stage_seconds_first": {s["stage"]: s["seconds"] for s in results[0]["stages"]},
    }
    if codec is not None:
        figures["extract_one_file_changed"] = {k: results[2]["stages"][2]["summary"][k] for k in ("extracted", "skipped")}
    for key, value in figures.items():
        print(f"{key:32s} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def demo(json_out: Path | None) -> None:
    """First run and unchanged rerun of `fishtune demo`, each a fresh process, wall-timed."""
    import re
    import subprocess

    import resource

    def children_cpu() -> float:  # user + sys of reaped children (the demo, and the server it reaped)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    walls, cpus, tails = [], [], []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for _ in ("first", "rerun"):
            started, cpu = time.perf_counter(), children_cpu()
            done = subprocess.run([sys.executable, "-m", "fishtune", "demo", "--output", str(Path(tmp) / "demo")],
                                  capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
            walls.append(time.perf_counter() - started)
            cpus.append(children_cpu() - cpu)
            if done.returncode != 0:
                raise SystemExit(f"fishtune demo failed ({done.returncode}): {done.stderr[-2000:]}")
            tails.append(done.stdout + done.stderr)

    def stage_seconds(text: str) -> dict[str, str]:  # the demo's end table: | stage | cache | seconds | artifact |
        found = {}
        for line in text.splitlines():
            cells = [c.strip() for c in line.split("\u2502")]
            if len(cells) >= 4 and re.fullmatch(r"[a-z]+", cells[1]) and re.fullmatch(r"[0-9.]+", cells[3]):
                found[cells[1]] = f"{cells[3]} s ({cells[2]})"
        return found

    figures = {
        "first_s": round(walls[0], 1),
        "rerun_s": round(walls[1], 1),
        "rerun_over_first": round(walls[1] / walls[0], 3),
        "first_cpu_s": round(cpus[0], 1),  # CPU seconds (user + sys): less sensitive to other load than wall
        "rerun_cpu_s": round(cpus[1], 1),
        "stage_seconds_first": stage_seconds(tails[0]),
        "stage_seconds_rerun": stage_seconds(tails[1]),
        "cpus": os.cpu_count(),
        "load_average_1min_before": round(load_before, 2),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
    }
    for key, value in figures.items():
        print(f"{key:32s} {value}")
    if json_out:
        json_out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
