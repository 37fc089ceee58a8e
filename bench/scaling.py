"""How cost grows with workers and with data: extract and normalize at 1 vs 2 workers, the flow at 1x/5x/20x.

    python bench/scaling.py                       # all three parts (a few minutes on 2 cores)
    python bench/scaling.py --scales 1 5 --max-steps 2
    python bench/scaling.py --parts flow --json out.json

* extract: the real-size codec (random init) on ``--extract-seconds`` of speech-like clips
  (1-15 s, mixed rates), bucketed batches of 8, ``--num-workers`` 1 vs 2 decode processes
  (torch threads left at the default), and torch threads 1 vs 2 at one decode process; each
  configuration in a fresh process, codes checked identical.
* normalize: ``--normalize-copies`` copies of the demo dataset, 1 vs 2 worker processes.
* flow: the finetune flow (local ephemeral Prefect, tiny random codec and base model, the
  ``tiny`` training preset, ``--max-steps`` steps) on the demo speakers' clips replicated 1x, 5x
  and 20x, each scale into a fresh store, after one untimed 1x run (imports and warm-up). Reports the flow's wall time, each stage's wall time,
  and the ratio to 1x; the data stages (validate, normalize, extract, pack) should grow about
  linearly with data, train (fixed steps) and merge should not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA_STAGES = ("validate", "normalize", "extract", "pack")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def extract_scaling(seconds: float) -> dict:
    from bench.extract import make_audio

    import numpy as np

    configs = [(1, 0), (2, 0), (1, 1)]  # (decode workers, torch threads; 0 = torch's default)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_audio(folder, seconds, seed=1)
        codes = []
        for workers, threads in configs:
            out = folder / f"codes-{workers}-{threads}.npz"
            command = [sys.executable, str(ROOT / "bench" / "extract.py"), "--worker", "--data", str(folder),
                       "--out", str(out), "--batch-size", "8", "--order", "bucketed", "--num-workers", str(workers),
                       "--threads", str(threads), "--max-batch-seconds", "60"]
            line = subprocess.run(command, check=True, capture_output=True, text=True, env=_env()).stdout
            stats = json.loads(line.strip().splitlines()[-1])
            rows.append({"workers": workers, "threads": threads or "default",
                         "audio_s_per_s": round(stats["audio_seconds"] / stats["wall"], 2),
                         "audio_seconds": round(stats["audio_seconds"], 1), "wall_s": round(stats["wall"], 2)})
            with np.load(out) as loaded:
                codes.append({k: loaded[k] for k in loaded.files})
    identical = all(set(c) == set(codes[0]) and all(np.array_equal(c[k], codes[0][k]) for k in c) for c in codes)
    speed = {(r["workers"], r["threads"]): r["audio_s_per_s"] for r in rows}
    return {"rows": rows, "codes_identical": identical,
            "workers_2_over_1": round(speed[2, "default"] / speed[1, "default"], 3),
            "threads_default_over_1": round(speed[1, "default"] / speed[1, 1], 3)}


def normalize_scaling(copies: int) -> dict:
    import shutil

    from bench.normalize import DEMO, run

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        for copy in range(copies):
            for speaker in sorted(d for d in DEMO.iterdir() if d.is_dir()):  # flat: no nested speakers
                shutil.copytree(speaker, src / f"{speaker.name}-copy{copy:02d}")
        rows = [run(src, Path(tmp) / f"out{w}", w) for w in (1, 2)]
    for r in rows:
        r.pop("peak_rss_mb")  # cumulative within this process: see bench/memory.py for memory
    return {"rows": rows, "workers_2_over_1": round(rows[1]["audio_seconds_per_second"] / rows[0]["audio_seconds_per_second"], 3)}


def replicate_demo(dest: Path, scale: int) -> int:
    """Copy each demo speaker's clips ``scale`` times into the same speaker folder; returns clips."""
    import shutil

    from bench.normalize import DEMO

    count = 0
    for speaker in sorted(p for p in DEMO.iterdir() if p.is_dir()):
        (dest / speaker.name).mkdir(parents=True)
        for r in range(scale):
            for f in sorted(speaker.iterdir()):
                shutil.copy2(f, dest / speaker.name / f"r{r:02d}_{f.name}")
                count += f.suffix != ".lab"
    return count


def flow_scaling(scales: list[int], max_steps: int) -> dict:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect-home"))  # never the user's ~/.prefect
        from prefect import flow

        from fish_speech_core.codec import init_codec, save_codec
        from fish_speech_core.codec.config import FireflyConfig
        from fish_speech_core.lm import PRESETS
        from fish_speech_core.lm.init_base import init_base
        from fishtune.flows.config import FinetuneConfig
        from fishtune.flows.finetune import finetune

        @flow
        def warm_up() -> None:  # starts the ephemeral server outside the timed runs
            return None

        codec = tmp / "codec-tiny.pth"
        save_codec(init_codec(FireflyConfig.from_name("tiny"), seed=0), codec)
        init_base(tmp / "base", PRESETS["tiny"], seed=0)
        warm_up()
        # One untimed 1x run first: the first flow in a process pays one-time imports and kernel
        # set-up (lightning, the codec, torch ops; several seconds), which would inflate the 1x
        # baseline and make growth look sublinear.
        replicate_demo(tmp / "data-warm", 1)
        finetune(FinetuneConfig(data=str(tmp / "data-warm"), storage=str(tmp / "store-warm"), project="bench",
                                codec=str(codec), base=str(tmp / "base"), preset="tiny", max_steps=max_steps,
                                progress_every=max_steps))
        rows = []
        for scale in scales:
            clips = replicate_demo(tmp / f"data{scale}", scale)
            config = FinetuneConfig(data=str(tmp / f"data{scale}"), storage=str(tmp / f"store{scale}"),
                                    project="bench", codec=str(codec), base=str(tmp / "base"), preset="tiny",
                                    max_steps=max_steps, progress_every=max_steps)
            started = time.perf_counter()
            result = finetune(config)
            wall = time.perf_counter() - started
            stages = {s["stage"]: round(s["seconds"], 2) for s in result["stages"]}
            rows.append({"scale": scale, "clips": clips, "wall_s": round(wall, 2), "stages": stages,
                         "data_stages_s": round(sum(stages.get(s, 0.0) for s in DATA_STAGES), 2)})
            print(f"flow {scale:>2}x ({clips} clips): {wall:6.1f} s; " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()),
                  flush=True)
    base = rows[0]
    for r in rows:
        r["wall_over_1x"] = round(r["wall_s"] / base["wall_s"], 2)
        r["data_stages_over_1x"] = round(r["data_stages_s"] / base["data_stages_s"], 2)
    return {"rows": rows, "max_steps": max_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["extract", "normalize", "flow"],
                        choices=["extract", "normalize", "flow"], help="Which measurements to run.")
    parser.add_argument("--extract-seconds", type=float, default=90.0, help="Audio for the extract part (default 90).")
    parser.add_argument("--normalize-copies", type=int, default=10, help="Copies of the demo data for normalize.")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 5, 20], help="Flow data scales (first = baseline).")
    parser.add_argument("--max-steps", type=int, default=4, help="Training steps in each flow run (fixed per scale).")
    parser.add_argument("--json", type=Path, help="Also write the figures as JSON here.")
    args = parser.parse_args()

    figures: dict = {"stage": "scaling", "cpus": os.cpu_count()}
    if "extract" in args.parts:
        e = figures["extract"] = extract_scaling(args.extract_seconds)
        for r in e["rows"]:
            print(f"extract  {r['workers']} decode worker(s), torch threads {r['threads']}: "
                  f"{r['audio_s_per_s']:6.1f} audio-s/s ({r['audio_seconds']:.0f} audio-s in {r['wall_s']:.1f} s)")
        print(f"extract  2 / 1 decode workers: {e['workers_2_over_1']:.2f}x; torch default / 1 thread: "
              f"{e['threads_default_over_1']:.2f}x; codes identical: {e['codes_identical']}", flush=True)
    if "normalize" in args.parts:
        n = figures["normalize"] = normalize_scaling(args.normalize_copies)
        for r in n["rows"]:
            print(f"normalize {r['workers']} worker(s): {r['audio_seconds_per_second']:6.1f} audio-s/s "
                  f"({r['files']} files, {r['audio_seconds']:.0f} audio-s in {r['wall_seconds']:.1f} s)")
        print(f"normalize 2 / 1 workers: {n['workers_2_over_1']:.2f}x", flush=True)
    if "flow" in args.parts:
        f = figures["flow"] = flow_scaling(args.scales, args.max_steps)
        for r in f["rows"]:
            print(f"flow {r['scale']:>2}x: {r['wall_s']:6.1f} s = {r['wall_over_1x']:.2f}x of 1x; data stages "
                  f"{r['data_stages_s']:.1f} s = {r['data_stages_over_1x']:.2f}x of 1x (train: {args.max_steps} steps)")
    if args.json:
        from fish_speech_core.files import atomic_write

        with atomic_write(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)
    if "extract" in figures and not figures["extract"]["codes_identical"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
