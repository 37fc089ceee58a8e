"""Peak memory (RSS) of every stage, each in a fresh process, and what fits in 24 GB.

    python bench/memory.py            # demo stages + real-size extraction (60 s) and LM step (1x1024)
    python bench/memory.py --full     # also batch 2 (measured slope) and a fixed glibc mmap threshold
    python bench/memory.py --skip-real  # demo stages only (~1 min)

Demo stages run the ``fishtune`` CLI on ``examples/demo-data`` (normalize -> extract with the
real-size codec -> pack -> train 2 steps of the tiny LM -> merge -> synthesize), all in one
process each (``--num-workers 0/1``), so a figure is one process's peak. Real size: extraction
of one 60 s clip with the ``fish-speech-1.4`` codec preset, and one full LoRA training step
(forward, backward, clip, AdamW; r 8, dropout 0.01) of the ``fish-speech-1.4`` LM preset at
batch x 1024 tokens with activation checkpointing on and off. Weights are random (``init_*``):
memory does not depend on their values.

Peak RSS comes from ``os.wait4`` on each child (the kernel's high-water mark of that process
tree's largest process), so figures never mix. The baseline in the same run is a bare
interpreter that imports torch; every row also shows its ratio to it.
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
sys.path.insert(0, str(ROOT))  # `python bench/memory.py`: this checkout's packages
DEMO = ROOT / "examples" / "demo-data"
BUDGET_GIB = 24.0
HEADROOM_GIB = 1.0  # OS, page cache and allocator slack we do not plan to use
MMAP_THRESHOLD = 1 << 20  # glibc: allocations >= 1 MiB get their own mapping, unmapped on free


def run_measured(command: list[str], cwd: Path = ROOT, extra_env: dict | None = None) -> dict:
    """Run ``command``; its peak RSS (MiB, via wait4), wall seconds and stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "COLUMNS": "200", "NO_COLOR": "1", **(extra_env or {})}
    with tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {proc.returncode}):\n{text[-3000:]}")
    return {"peak_mib": usage.ru_maxrss / 1024, "wall_s": wall, "output": text}


def fishtune(*args: str) -> list[str]:
    return [sys.executable, "-m", "fishtune", *args]


def make_clip(path: Path, seconds: float, rate: int = 44100) -> None:
    import numpy as np
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(120 + 40 * np.sin(2 * np.pi * 0.5 * t)) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
    soundfile.write(path, (0.1 * voice).astype(np.float32), rate, subtype="PCM_16")


def lm_step(batch: int, seq_len: int, checkpointing: bool, preset: str, threads: int) -> None:
    """Child mode: build the LM with LoRA, run one training step, print a JSON line."""
    import torch

    from bench.train import build_lora_step
    from fish_speech_core.lm import training_loss_sums

    model, params, optimizer, (inputs, labels, padding) = build_lora_step(
        preset, checkpointing, batch, seq_len, threads=threads)
    built_mib = vm_kib("VmRSS") / 1024
    started = time.perf_counter()
    training_loss_sums(model, inputs, padding, labels).loss().backward()  # what `fishtune train` runs
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    print(json.dumps({"built_mib": built_mib, "step_s": time.perf_counter() - started,
                      "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                      "hwm_mib": vm_kib("VmHWM") / 1024}))


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def demo_stages(tmp: Path) -> list[dict]:
    """Every CLI stage once on the demo data; returns rows in pipeline order."""
    norm, shards, base, runs, merged = tmp / "norm", tmp / "shards", tmp / "base", tmp / "runs", tmp / "merged"
    codec, tiny_codec = tmp / "codec-real.pth", tmp / "codec-tiny.pth"
    subprocess.run(fishtune("init-codec", str(codec), "--preset", "fish-speech-1.4"), check=True, capture_output=True, cwd=ROOT)
    subprocess.run(fishtune("init-base", str(base), "--preset", "tiny"), check=True, capture_output=True, cwd=ROOT)
    steps = [
        ("normalize", "demo, 1 process", fishtune("normalize", str(DEMO), str(norm), "--num-workers", "1")),
        ("extract", "demo, real-size codec, batch 16", fishtune(
            "extract", str(norm), "--checkpoint-path", str(codec), "--num-workers", "0", "--device", "cpu")),
        ("pack", "demo, 1 worker", fishtune("pack", "-i", str(norm), "-o", str(shards), "-j", "1")),
        ("train", "demo, tiny LM, 2 steps of 2x256", fishtune(
            "train", "--project", "mem", "--base", str(base), "--data", str(shards), "--max-steps", "2",
            "--batch-size", "2", "--max-length", "256", "--val-check-interval", "2", "--results-dir", str(runs),
            "--devices", "1", "--num-workers", "0")),
    ]
    rows = []
    for stage, what, command in steps:
        rows.append({"stage": stage, "what": what, **_drop_output(run_measured(command))})
    ckpt = max((runs / "mem").rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    rows.append({"stage": "merge", "what": "tiny LM + its LoRA", **_drop_output(run_measured(fishtune(
        "merge", "--base-weight", str(base), "--lora-weight", str(ckpt), "--output", str(merged))))})
    subprocess.run(fishtune("init-codec", str(tiny_codec), "--preset", "tiny"), check=True, capture_output=True, cwd=ROOT)
    for label, path in (("tiny", tiny_codec), ("real-size", codec)):
        rows.append({"stage": "synthesize", "what": f"merged tiny LM, {label} codec, 64 frames", **_drop_output(
            run_measured(fishtune("synthesize", "--model", str(merged), "--codec", str(path), "--text", "Hello there.",
                                  "-o", str(tmp / f"out-{label}.wav"), "--max-new-tokens", "64", "--device", "cpu")))})
    return rows


def real_stages(tmp: Path, threads: int, full: bool, baseline: float) -> list[dict]:
    codec = tmp / "codec-real.pth"
    if not codec.is_file():
        subprocess.run(fishtune("init-codec", str(codec), "--preset", "fish-speech-1.4"), check=True, capture_output=True, cwd=ROOT)
    clip_dir = tmp / "long" / "speaker"
    clip_dir.mkdir(parents=True)
    make_clip(clip_dir / "clip.wav", 60.0)
    (clip_dir / "clip.lab").write_text("a sixty second clip\n")
    rows = [{"stage": "extract", "what": "60 s clip, real-size codec", **_drop_output(run_measured(fishtune(
        "extract", str(tmp / "long"), "--checkpoint-path", str(codec), "--num-workers", "0", "--device", "cpu",
        "--max-seconds", "61")))}]
    if not (clip_dir / "clip.npy").is_file():
        raise RuntimeError("extract wrote no codes for the 60 s clip")
    _print_rows(rows, baseline)
    cases = [(1, True, None), (1, False, None)]
    if full:  # glibc keeps freed activation memory mapped; a fixed mmap threshold returns it at once,
        # so the peak follows live tensors and the batch slope is measurable (see fits_24gb)
        cases += [(1, True, MMAP_THRESHOLD), (2, True, MMAP_THRESHOLD)]
    for batch, checkpointing, threshold in cases:
        env = {"MALLOC_MMAP_THRESHOLD_": str(threshold)} if threshold else {}
        r = run_measured([sys.executable, __file__, "--lm-step", "--batch", str(batch), "--seq", "1024",
                          "--threads", str(threads)] + (["--checkpointing"] if checkpointing else []), extra_env=env)
        figures = json.loads(r["output"].strip().splitlines()[-1])
        what = (f"real-size LM {batch}x1024, checkpointing {'on' if checkpointing else 'off'}"
                + (f", MALLOC_MMAP_THRESHOLD_={threshold}" if threshold else ""))
        rows.append({"stage": "train step", "what": what, "batch": batch, "seq": 1024, "checkpointing": checkpointing,
                     "mmap_threshold": threshold, "peak_mib": r["peak_mib"], "wall_s": r["wall_s"], **figures})
        _print_rows(rows[-1:], baseline)
    return rows


def _drop_output(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "output"}


def fits_24gb(rows: list[dict]) -> dict | None:
    """Largest batch at seq 1024 whose checkpointed step fits 24 GiB (minus headroom).

    Activations scale linearly with batch at a fixed sequence length: peak(B) = fixed + B * per_sample.
    With the glibc default allocator, freed activation memory stays mapped and the peak depends
    on fragmentation (2x1024 can peak lower than 1x1024), so: with the ``--full`` rows (fixed mmap
    threshold, batch 1 and 2) the slope is measured; otherwise per_sample = peak(1) - RSS after
    building, an overestimate with the default allocator (conservative).
    """
    steps = {(r["batch"], r["checkpointing"], r["mmap_threshold"]): r for r in rows if r["stage"] == "train step"}
    budget = (BUDGET_GIB - HEADROOM_GIB) * 1024
    out: dict = {}
    a, b = steps.get((1, True, MMAP_THRESHOLD)), steps.get((2, True, MMAP_THRESHOLD))
    if a and b:
        per_sample = b["peak_mib"] - a["peak_mib"]
        fixed = a["peak_mib"] - per_sample
        out = {"fixed_mib": round(fixed), "per_sample_1024_mib": round(per_sample),
               "method": f"slope between batch 1 and 2 with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}",
               "max_batch_at_1024": max(0, int((budget - fixed) // per_sample)) if per_sample > 0 else None}
    for checkpointing, suffix in ((True, "_default_allocator"), (False, "_no_checkpointing")):
        r = steps.get((1, checkpointing, None))
        if r:
            per_sample = r["peak_mib"] - r["built_mib"]
            out[f"per_sample_1024_mib{suffix}"] = round(per_sample)
            out[f"max_batch_at_1024{suffix}"] = max(0, int((budget - r["built_mib"]) // per_sample))
            out.setdefault("fixed_mib", round(r["built_mib"]))
    if not out:
        return None
    if "max_batch_at_1024" not in out and "max_batch_at_1024_default_allocator" in out:
        out["max_batch_at_1024"] = out["max_batch_at_1024_default_allocator"]
        out["per_sample_1024_mib"] = out["per_sample_1024_mib_default_allocator"]
        out["method"] = "peak minus RSS after building, batch 1, default allocator (conservative)"
    return out


def describe_fit(fit: dict) -> str:
    text = (f"real-size LoRA training on CPU, fp32, checkpointing on: {fit['fixed_mib']:,} MiB fixed (weights, "
            f"adapters, optimizer, batch) + {fit['per_sample_1024_mib']:,} MiB per 1024-token sample "
            f"({fit['method']}) -> batch <= {fit['max_batch_at_1024']} at seq 1024")
    if "max_batch_at_1024_default_allocator" in fit and "MALLOC" in fit["method"]:
        text += (f"; with the default allocator at batch 1, {fit['per_sample_1024_mib_default_allocator']:,} MiB "
                 f"-> batch <= {fit['max_batch_at_1024_default_allocator']}")
    if "max_batch_at_1024_no_checkpointing" in fit:
        text += (f"; checkpointing off (default allocator): {fit['per_sample_1024_mib_no_checkpointing']:,} MiB "
                 f"per sample -> batch <= {fit['max_batch_at_1024_no_checkpointing']}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="Also the real-size LM step at batch 2 (measured slope).")
    parser.add_argument("--skip-real", action="store_true", help="Demo stages only.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the LM step.")
    parser.add_argument("--json", type=Path, help="Also write the figures as JSON here.")
    # internal: one LM training step in a child process
    parser.add_argument("--lm-step", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="fish-speech-1.4", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lm_step:
        lm_step(args.batch, args.seq, args.checkpointing, args.preset, args.threads)
        return

    baseline = run_measured([sys.executable, "-c", "import torch"])["peak_mib"]
    print(f"baseline: python + import torch = {baseline:.0f} MiB peak RSS", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = [dict(r, scope="demo") for r in demo_stages(tmp)]
        _print_rows(rows, baseline)
        if not args.skip_real:
            real = real_stages(tmp, args.threads, args.full, baseline)
            rows += [dict(r, scope="real-size") for r in real]
    fit = fits_24gb(rows)
    if fit:
        print(f"\nwhat fits in {BUDGET_GIB:g} GiB (keeping {HEADROOM_GIB:g} GiB free): {describe_fit(fit)}")
    steps = {(r["batch"], r["checkpointing"], r["mmap_threshold"]): r for r in rows if r["stage"] == "train step"}
    on, off, mmap = steps.get((1, True, None)), steps.get((1, False, None)), steps.get((1, True, MMAP_THRESHOLD))
    figures = {"stage": "memory", "baseline_mib": round(baseline), "rows": rows, "fits_24gb": fit,
               "no_checkpointing_over_checkpointing": round(off["peak_mib"] / on["peak_mib"], 3) if on and off else None,
               "mmap_threshold_over_default": round(mmap["peak_mib"] / on["peak_mib"], 3) if on and mmap else None}
    if figures["no_checkpointing_over_checkpointing"]:
        print(f"train step peak, checkpointing off / on: {figures['no_checkpointing_over_checkpointing']:.2f}x")
    if figures["mmap_threshold_over_default"]:
        print(f"train step peak, MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} / default allocator: "
              f"{figures['mmap_threshold_over_default']:.2f}x (step {mmap['step_s']:.0f} s vs {on['step_s']:.0f} s)")
    if args.json:
        from fish_speech_core.files import atomic_write

        with atomic_write(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)


def _print_rows(rows: list[dict], baseline: float) -> None:
    for r in rows:
        extra = f"  (RSS after build {r['built_mib']:.0f} MiB, step {r['step_s']:.0f} s)" if "built_mib" in r else ""
        print(f"{r['stage']:<11} {r['what']:<44} peak {r['peak_mib']:8.0f} MiB  {r['peak_mib'] / baseline:5.1f}x "
              f"baseline  wall {r['wall_s']:6.1f} s{extra}", flush=True)


if __name__ == "__main__":
    main()
