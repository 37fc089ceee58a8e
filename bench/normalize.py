"""Benchmark loudness normalization: audio-seconds per second, N workers vs 1 worker.

    python bench/normalize.py [--repeat 20] [--workers N] [--json OUT]

Input: the bundled demo dataset copied --repeat times. Each configuration writes into a fresh
output folder (no skips). Prints throughput, peak RSS and the ratio N/1 measured in this run.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fish_speech_core.normalize import normalize_tree  # noqa: E402
from fish_speech_core.parallel import default_workers  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo-data"


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024  # Linux reports KiB


def run(src: Path, out: Path, workers: int) -> dict:
    started = time.perf_counter()
    report = normalize_tree(src, out, num_workers=workers, show_progress=False)
    wall = time.perf_counter() - started
    audio = report.summary()["audio_seconds_written"]
    return {"workers": workers, "files": report.count("written"), "audio_seconds": audio,
            "wall_seconds": wall, "audio_seconds_per_second": audio / wall, "peak_rss_mb": peak_rss_mb()}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20, help="Copies of the demo dataset (default 20).")
    parser.add_argument("--workers", type=int, default=default_workers(), help="N for the parallel run.")
    parser.add_argument("--json", type=Path, help="Also write the results as JSON here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        for copy in range(args.repeat):
            for speaker in sorted(d for d in DEMO.iterdir() if d.is_dir()):  # flat: no nested speakers
                shutil.copytree(speaker, src / f"{speaker.name}-copy{copy:02d}")
        one = run(src, Path(tmp) / "out1", 1)
        many = run(src, Path(tmp) / "outN", args.workers)
    result = {"stage": "normalize", "baseline": one, "ours": many,
              "ratio": many["audio_seconds_per_second"] / one["audio_seconds_per_second"]}
    for r in (one, many):
        print(f"normalize {r['workers']} worker(s): {r['files']} files, {r['audio_seconds']:.0f} audio-s in "
              f"{r['wall_seconds']:.1f} s = {r['audio_seconds_per_second']:.0f} audio-s/s (validation included), "
              f"peak RSS {r['peak_rss_mb']:.0f} MB")
    print(f"ratio {args.workers} workers / 1 worker: {result['ratio']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
