"""Packing throughput: items/second with N worker processes vs 1, on a generated dataset.

    python bench/pack.py [--items 2000] [--speakers 10] [--workers N] [--repeats 5]

Prints both figures, their ratio, and checks the two packs are byte-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from fish_speech_core.pack import pack


def make_dataset(root: Path, items: int, speakers: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(items):
        folder = root / f"speaker{i % speakers:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        words = " ".join(f"word{w}" for w in rng.integers(0, 5000, int(rng.integers(5, 30))))
        (folder / f"{i:06d}.lab").write_text(f"{words} {{breath}} <tag> end.\n", encoding="utf-8")
        np.save(folder / f"{i:06d}.npy", rng.integers(0, 1024, (8, int(rng.integers(50, 301)))))


def rates(data: Path, out: Path, workers: list[int], repeats: int, items: int) -> list[float]:
    """Best items/s per worker count; runs alternate so a busy moment hits every setting alike."""
    best = [float("inf")] * len(workers)
    for _ in range(repeats):
        for k, n in enumerate(workers):
            start = time.perf_counter()
            summary = pack([data], out / str(n), num_workers=n)
            best[k] = min(best[k], time.perf_counter() - start)
            assert summary.sentences == items and not summary.rejects
    return [items / seconds for seconds in best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--speakers", type=int, default=10)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="Also write the figures as JSON here.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_dataset(root / "data", args.items, args.speakers)
        one, many = rates(root / "data", root / "out", [1, args.workers], args.repeats, args.items)
        shards = sorted((root / "out" / "1").iterdir())
        many_shards = sorted((root / "out" / str(args.workers)).iterdir())
        same = [p.read_bytes() for p in shards] == [p.read_bytes() for p in many_shards]
        size = sum(p.stat().st_size for p in shards)
    print(f"pack: {args.items} items, {args.speakers} speakers, {len(shards)} shard(s), {size / 2**20:.1f} MiB")
    print(f"  1 worker : {one:8.0f} items/s")
    print(f"  {args.workers} workers: {many:8.0f} items/s")
    print(f"  ratio    : {many / one:.2f}x  (byte-identical output: {same})")
    figures = {"stage": "pack", "items": args.items, "speakers": args.speakers, "shards": len(shards),
               "mib": round(size / 2**20, 2), "workers": args.workers, "items_per_s_1_worker": round(one),
               "items_per_s_n_workers": round(many), "ratio": round(many / one, 3), "byte_identical": same}
    if args.json:
        from fish_speech_core.files import atomic_write

        with atomic_write(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
