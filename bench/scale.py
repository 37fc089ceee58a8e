"""Scale-out figures: training tokens/s at world size 1 and 2 (DDP over gloo on CPU), and
extraction audio-s/s with 1 and 2 shards (bench/scale_extract.py).

    python bench/scale.py                          # every part
    python bench/scale.py --parts train --steps 20 --threads 1 --preset tiny
    python bench/scale.py --json out.json

* train: ``fishtune``'s own ``train()`` on a random-init base of ``--preset`` (tiny: dim 64, 2 + 1
  layers; mid: dim 512, 8 + 4 layers) and synthetic packed shards, the same global batch
  (``--batch-size``, split over the ranks) and seed at ``--devices 1`` and ``--devices 2``, each in
  a fresh process, ``--threads`` torch threads per rank (so world size 2 uses twice the cores,
  as a second GPU would). Reports the run's tokens/s (every rank's tokens, from the first
  training step to the last, no validation in between), s/step, the 2-over-1 ratio and its
  efficiency (ratio / 2), and the largest adapter difference between the two runs (they train
  the same adapters: DDP changes the speed, not the result).
* extract: ``bench/scale_extract.py`` (``--extract-seconds`` of generated speech, real-size codec
  with random weights): 1 shard vs 2 shard processes, the ratio, and whether the merged artifacts
  are byte-identical. On 2 CPU cores expect little gain; rerun on a GPU host with one GPU per shard.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/scale.py` and its worker processes


def _env(threads: int) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": str(threads)}


def make_training_inputs(folder: Path, preset: str, speakers: int = 4, sentences: int = 40) -> tuple[Path, Path]:
    """A random-init base of ``preset`` and packed shards of speech-like random codes."""
    import numpy as np

    from fish_speech_core.formats.protos import ShardWriter, make_text_data
    from fish_speech_core.lm import PRESETS
    from fish_speech_core.lm.init_base import init_base

    base, shards = folder / "base", folder / "shards"
    init_base(base, PRESETS[preset], seed=0)
    words = "the a quick brown fox jumps over lazy dog hello world voice speech model train".split()
    rng = np.random.default_rng(0)
    with ShardWriter(shards, shard_size_mb=1.0) as writer:
        for s in range(speakers):
            rows = [(" ".join(rng.choice(words, int(rng.integers(3, 12)))),
                     rng.integers(0, 1000, (8, int(rng.integers(20, 120)))).tolist()) for _ in range(sentences)]
            writer.write(make_text_data(f"SPK{s}", rows))
    return base, shards


def train_worker(args) -> None:
    """One training run (a fresh process): print its figures as a JSON line."""
    from fish_speech_core.finetune.module import TrainConfig
    from fish_speech_core.finetune.train import train

    import time

    reports, times = [], []

    def report(info) -> None:
        reports.append(info)
        times.append(time.perf_counter())

    config = TrainConfig(
        project=f"ws{args.devices}", base=str(args.base), data=(str(args.shards),), max_steps=args.steps,
        val_check_interval=args.steps + 1, batch_size=args.batch_size, max_length=args.max_length, lr=1e-4,
        results_dir=str(args.results), devices=str(args.devices), max_val_batches=1, val_fraction=0.05,
    )
    result = train(config, resume="never", progress=report, progress_every=1, show_progress=False)
    # tokens/s: every rank's tokens from the first step's start (train's own figure); s/step from
    # the end of step 1 on (step 1 warms up)
    print(json.dumps({"world_size": result.world_size, "tokens_per_s": reports[-1]["tokens_per_s"],
                      "s_per_step": round((times[-1] - times[0]) / max(len(times) - 1, 1), 4),
                      "loss": reports[-1]["loss"], "checkpoint": str(result.checkpoints[-1])}))


def train_scaling(preset: str, steps: int, batch_size: int, max_length: int, threads: int) -> dict:
    import time

    import torch

    from fish_speech_core.finetune.checkpoints import read_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base, shards = make_training_inputs(folder, preset)
        for devices in (1, 2):
            command = [sys.executable, str(ROOT / "bench" / "scale.py"), "--train-worker", "--devices", str(devices),
                       "--base", str(base), "--shards", str(shards), "--results", str(folder / "results"),
                       "--steps", str(steps), "--batch-size", str(batch_size), "--max-length", str(max_length)]
            started = time.perf_counter()
            out = subprocess.run(command, check=True, capture_output=True, text=True, env=_env(threads)).stdout
            row = json.loads(out.strip().splitlines()[-1])
            row["wall_s"] = round(time.perf_counter() - started, 1)  # the whole process: imports, validation, steps
            rows.append(row)
        a, b = (read_checkpoint(r.pop("checkpoint"))["state_dict"] for r in rows)
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    for r in rows:
        r["tokens_per_s"] = round(r["tokens_per_s"], 1)
    return {"preset": preset, "steps": steps, "global_batch": batch_size, "max_length": max_length,
            "threads_per_rank": threads, "torch": torch.__version__, "rows": rows,
            "ws2_over_ws1": round(ratio, 3), "efficiency": round(ratio / 2, 3), "adapters_max_diff": diff}


def print_train(figures: dict) -> None:
    print(f"train ({figures['preset']}, global batch {figures['global_batch']} x {figures['max_length']} tokens, "
          f"{figures['steps']} steps, {figures['threads_per_rank']} thread(s) per rank, gloo)")
    print(f"{'world size':>10} {'tokens/s':>10} {'s/step':>8} {'process wall s':>15}")
    for r in figures["rows"]:
        print(f"{r['world_size']:>10} {r['tokens_per_s']:>10.0f} {r['s_per_step']:>8.3f} {r['wall_s']:>15.1f}")
    print(f"world size 2 / 1: x{figures['ws2_over_ws1']:.2f} tokens/s (efficiency {figures['efficiency']:.0%}); "
          f"adapters differ by at most {figures['adapters_max_diff']:.1e}")


def extract_scaling(seconds: float, preset: str) -> dict:
    """Extraction audio-s/s with 1 and 2 shards (bench/scale_extract.py, in its own process: its
    shard processes are what it times)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "extract.json"
        subprocess.run([sys.executable, str(ROOT / "bench" / "scale_extract.py"), "--seconds", str(seconds),
                        "--preset", preset, "--json", str(out)], check=True,
                       env={k: v for k, v in _env(1).items() if k != "OMP_NUM_THREADS"})
        return json.loads(out.read_text())


PARTS = {"train": (lambda a: train_scaling(a.preset, a.steps, a.batch_size, a.max_length, a.threads), print_train),
         # scale_extract prints its own lines
         "extract": (lambda a: extract_scaling(a.extract_seconds, a.extract_preset), lambda figures: None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--preset", default="tiny", choices=["tiny", "mid"], help="train: model size")
    parser.add_argument("--steps", type=int, default=20, help="train: optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=8, help="train: the global batch (split over the ranks)")
    parser.add_argument("--max-length", type=int, default=256, help="train: tokens per sample")
    parser.add_argument("--threads", type=int, default=1, help="train: torch threads per rank")
    parser.add_argument("--extract-seconds", type=float, default=60.0, help="extract: seconds of audio to extract")
    parser.add_argument("--extract-preset", default="fish-speech-1.4", help="extract: codec preset (random init)")
    parser.add_argument("--json", type=Path, help="Also write the figures as JSON here.")
    # a training run in this process (what train_scaling starts)
    parser.add_argument("--train-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    for name in ("--base", "--shards", "--results"):
        parser.add_argument(name, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_worker:
        train_worker(args)
        return

    figures = {}
    for part in args.parts:
        compute, show = PARTS[part]
        figures[part] = compute(args)
        show(figures[part])
    if args.json:
        from fish_speech_core.files import atomic_write

        with atomic_write(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
