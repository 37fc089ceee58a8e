"""Sharded extraction: audio-seconds per second with 1 shard vs 2 shards at once, and the ratio.

    python bench/scale_extract.py                    # 2 min of audio, real-size codec (random init), CPU
    python bench/scale_extract.py --seconds 60 --preset tiny
    python bench/scale_extract.py --device cuda --gpus 0 1   # one GPU per shard process

What a sharded run does minus Prefect: K=1 is one process running the extract task body on
everything (what a single extract child does); K=2 is two processes at once, each running the
extract-shard task body on its shard, then the merge into the one extract artifact (in this
process, timed). Wall time runs from starting the processes to the published artifact, so each
process's start, imports and codec load (the fixed cost every shard pays) are in it. A Prefect
child run adds its own start-up on top (a flow-run process on a worker: ~10-20 s on 2 cores).

On CPU the shards share the cores: torch threads per process are the CPUs / K (``--threads``
overrides), so the ratio shows what splitting costs or gains there; with one GPU per shard
(``--gpus``) it shows the scale-out. The two artifacts are checked byte-identical.
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


def _env(extra: dict[str, str] | None = None) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra or {})}


def child(args: argparse.Namespace) -> None:
    """One process: the extract (or extract-shard) task body; prints a JSON line of its timings."""
    import torch

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    from fishtune.tasks.codec import extract_shard_task, extract_task
    from fishtune.tasks.params import ExtractParams

    params = ExtractParams(device=args.device, num_workers=1)
    if args.shards == 1:
        result = extract_task.fn(args.data, args.codec, args.store, params, work_dir=args.work)
    else:
        result = extract_shard_task.fn(args.data, args.codec, args.store, args.shard, args.shards, params,
                                       work_dir=args.work)
    print(json.dumps({"key": result["key"], "files": result["summary"]["files"],
                      "audio_seconds": result["summary"]["audio_seconds"], "wall": time.perf_counter() - started}))


def run(data: Path, codec: Path, root: Path, shards: int, args: argparse.Namespace) -> dict:
    """K processes at once (+ the merge for K > 1); wall time to the published extract artifact."""
    from fishtune.tasks.codec import merge_shards, shard_items
    from fishtune.tasks.params import ExtractParams

    store, threads = root / f"store-{shards}", args.threads or max(1, (os.cpu_count() or 1) // shards)
    planned = [i for i in range(shards) if shard_items(str(data), i, shards, ".lab")]
    started = time.perf_counter()
    procs = []
    for number, i in enumerate(planned):
        extra = {"CUDA_VISIBLE_DEVICES": str(args.gpus[number % len(args.gpus)])} if args.gpus else {}
        command = [sys.executable, __file__, "--child", "--data", str(data), "--codec", str(codec), "--store", str(store),
                   "--work", str(root / f"work-{shards}-{i}"), "--shard", str(i), "--shards", str(shards),
                   "--device", args.device, "--threads", str(threads)]
        procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=_env(extra)))
    lines = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"shard process failed ({proc.returncode})")
        lines.append(json.loads(out.strip().splitlines()[-1]))
    merge_s = 0.0
    key = lines[0]["key"]
    if shards > 1:
        merge_started = time.perf_counter()
        merged = merge_shards.fn(str(data), str(codec), str(store), ExtractParams(device=args.device, num_workers=1),
                                 [line["key"] for line in lines])
        merge_s, key = time.perf_counter() - merge_started, merged["key"]
    wall = time.perf_counter() - started
    audio = sum(line["audio_seconds"] for line in lines)
    return {"shards": shards, "processes": len(lines), "threads_per_process": threads, "audio_seconds": round(audio, 1),
            "wall_s": round(wall, 2), "merge_s": round(merge_s, 2), "audio_s_per_s": round(audio / wall, 2),
            "process_wall_s": [round(line["wall"], 2) for line in lines], "key": key, "store": str(store)}


def _artifact_bytes(store: str, key: str) -> dict[str, bytes]:
    from fish_speech_core.storage import Store

    art = Store(store).lookup("extract", key)
    return {rel: Path(art.file_url(rel)).read_bytes() for rel in art.files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="audio to generate (clips of 1-15 s)")
    parser.add_argument("--preset", default="fish-speech-1.4", help="codec preset (random init): fish-speech-1.4 or tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--gpus", nargs="*", default=None, help="CUDA device ids, one per shard process")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: CPUs / K)")
    parser.add_argument("--json", type=Path, help="Also write the figures as JSON here.")
    # internal: one shard process
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--data", "--codec", "--store", "--work"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--shard", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from bench.extract import make_audio
    from fish_speech_core.codec import init_codec, save_codec
    from fish_speech_core.codec.config import FireflyConfig

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data"
        for seed, speaker in enumerate(("spk-a", "spk-b")):  # two speaker folders, like a dataset
            (data / speaker).mkdir(parents=True)
            for clip in make_audio(data / speaker, args.seconds / 2, seed=seed):
                clip.with_suffix(".lab").write_text(f"sentence {clip.stem}")
        codec = root / "codec.pth"
        save_codec(init_codec(FireflyConfig.from_name(args.preset), seed=0), codec)
        rows = [run(data, codec, root, shards, args) for shards in (1, 2)]
        one, two = (_artifact_bytes(r["store"], r["key"]) for r in rows)
        identical = rows[0]["key"] == rows[1]["key"] and one == two
    ratio = round(rows[1]["audio_s_per_s"] / rows[0]["audio_s_per_s"], 3)
    for r in rows:
        print(f"extract {r['shards']} shard(s): {r['audio_seconds']:.0f} audio-s in {r['wall_s']:.1f} s = "
              f"{r['audio_s_per_s']:.1f} audio-s/s ({r['processes']} process(es) x {r['threads_per_process']} torch "
              f"threads, each {r['process_wall_s']} s; merge {r['merge_s']:.2f} s)")
    print(f"2 shards / 1 shard: {ratio:.2f}x; artifacts byte-identical: {identical} "
          f"({os.cpu_count()} CPUs, device {args.device}, codec {args.preset})")
    figures = {"rows": [{k: v for k, v in r.items() if k not in ("store", "key")} for r in rows],
               "ratio_2_over_1": ratio, "identical": identical, "device": args.device, "preset": args.preset,
               "cpus": os.cpu_count()}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
