"""Packing throughput: items/second with N worker processes vs 1, on a generated dataset.

    python bench/pack.py [--items 2000] [--speakers 10] [--workers N] [--repeats 5] [--small-items 28]

Prints both figures, their ratio, and checks the two packs are byte-identical; then the same for
a demo-sized pack (--small-items), where starting a worker pool costs more than it saves, and
the worker count ``fishtune pack`` picks by default for each size.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from fish_speech_core.pack import default_pack_workers, pack
from fish_speech_core.parallel import default_workers


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
    parser.add_argument("--small-items", type=int, default=28, help="a demo-sized pack (0: skip)")
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
        if args.small_items:
            make_dataset(root / "small", args.small_items, min(args.speakers, 3), seed=1)
            small = rates(root / "small", root / "out-small", [1, args.workers], max(args.repeats, 5), args.small_items)
    print(f"pack: {args.items} items, {args.speakers} speakers, {len(shards)} shard(s), {size / 2**20:.1f} MiB")
    print(f"  1 worker : {one:8.0f} items/s")
    print(f"  {args.workers} workers: {many:8.0f} items/s")
    print(f"  ratio    : {many / one:.2f}x  (byte-identical output: {same}); "
          f"default workers here: {default_pack_workers(args.items, default_workers())}")
    if args.small_items:
        print(f"pack: {args.small_items} items: 1 worker {small[0]:.0f} items/s, {args.workers} workers {small[1]:.0f} "
              f"items/s, ratio {small[1] / small[0]:.2f}x; default workers here: "
              f"{default_pack_workers(args.small_items, default_workers())}")
    figures = {"stage": "pack", "items": args.items, "speakers": args.speakers, "shards": len(shards),
               "mib": round(size / 2**20, 2), "workers": args.workers, "items_per_s_1_worker": round(one),
               "items_per_s_n_workers": round(many), "ratio": round(many / one, 3), "byte_identical": same,
               "default_workers": default_pack_workers(args.items, default_workers())}
    if args.small_items:
        figures["small"] = {"items": args.small_items, "items_per_s_1_worker": round(small[0]),
                            "items_per_s_n_workers": round(small[1]), "ratio": round(small[1] / small[0], 3),
                            "default_workers": default_pack_workers(args.small_items, default_workers())}
    if args.json:
        from fish_speech_core.files import atomic_write

        with atomic_write(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
