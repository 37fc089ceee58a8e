"""fishtune's side of the comparison with the reference (shared/notes, issue 17) in one command.

    python bench/compare.py            # the table's shapes (~15-25 min on 2 quiet cores)
    python bench/compare.py --quick    # smoke sizes (a few minutes): tiny LM, 4 clips, no demo
    python bench/compare.py --only extract startup --json out.json

Every figure comes with a baseline measured in the same run, so a row reads the same on a busy
or a quiet machine:

* train: LoRA step (dim 512, 8 + 4 layers, vocab 32k, 2 x 1024, r 8, dropout 0.01; ``tiny``
  4 x 256 with --quick) with the default config (checkpointing off) and with checkpointing on,
  tokens/s and peak RSS, each in a fresh process; baseline: the reference-like step (explicit
  attention, checkpointing on) from ``bench/train.py``.
* extract: real-size Firefly (random init) on 24 clips / 184 s of speech-like audio at 16-48 kHz:
  audio-s/s inside the loop with the CLI's CPU defaults; baselines alternated in one process:
  the loop with one decode process, and the encoder alone on pre-decoded audio
  (``bench/extract.py:loop_vs_encoder``).
* extract CLI: ``fishtune extract`` on the same clips as a whole (start-up, planning, loading,
  writing), audio-s/s and peak RSS; baseline: the in-loop figure.
* start-up: ``fishtune extract`` with every file up to date (imports, codec load, planning) above
  ``python -c 'import torch'``, and ``fishtune extract --help`` (imports no torch); fresh
  processes, alternated, best of 3; baseline: the bare torch import.
* demo: ``fishtune demo`` first run and unchanged rerun (``bench/flow.py --demo``); baseline: the
  first run.

With ``--reference-python PATH`` (the interpreter of a venv that holds Fish Speech 1.4.3; setup in
docs/performance.md, "Measuring against the reference"), the train and extract rows also run the
reference's own code through ``bench/reference.py`` in that interpreter, alternated with ours in
the same sitting, and print ours / reference beside the baselines above: the LoRA step (its
DualARTransformer, LoRA and training_step at the same shape and settings, in a fresh process) and
extraction in the loop (its Firefly with ``extract_vq.py``'s batching, batch 16 and batch 1; the
better of the two is the reference's best setting).

Benchmarks, not tests: nothing here asserts a speed. The machine's load average is printed
beside the figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/compare.py` and its spawned workers: this checkout

ROWS = ("train", "extract", "startup", "demo")


def _in_fresh_process(fn, *args):
    """``fn(*args)`` in a spawned process, so its peak RSS and thread pools are its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def run_reference(python: str, *args: str) -> dict:
    """``bench/reference.py ARGS`` in the reference's interpreter (its own venv); its figures."""
    # Our PYTHONPATH / venv must not leak into the reference's interpreter.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "reference.json"
        command = [python, str(ROOT / "bench" / "reference.py"), *args, "--json", str(out)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"reference driver failed (exit {done.returncode}): {' '.join(command)}: {last}")
        print(done.stdout.strip(), flush=True)
        return json.loads(out.read_text())


def train_row(quick: bool, steps: int, reference_python: str | None = None) -> dict:
    from bench.train import run_case

    preset = "tiny" if quick else "mid"
    cases, reference = {}, None
    for case in ("ours", "ours+checkpointing", "reference-like"):
        cases[case] = _in_fresh_process(run_case, preset, case, steps, 2)
        if case == "ours" and reference_python:  # alternated: ours, the reference, then the rest of ours
            reference = run_reference(reference_python, "train", "--preset", preset, "--steps", str(steps),
                                      "--threads", "2")
    base = cases["reference-like"]["tokens_per_s"]
    row = {"preset": preset, "steps": steps, "cases": cases,
           "over_reference_like": {k: round(c["tokens_per_s"] / base, 3) for k, c in cases.items()}}
    if reference:
        row["reference"] = reference
        row["over_reference"] = {k: {"speed": round(c["tokens_per_s"] / reference["tokens_per_s"], 3),
                                     "peak_rss": round(c["peak_rss_mib"] / reference["peak_rss_mib"], 3)}
                                 for k, c in cases.items()}
    return row


def make_data(tmp: Path, quick: bool) -> tuple[Path, Path]:
    """The clips (with transcripts: extract only takes audio that has one) and a real-size codec."""
    from bench.extract import make_mixed_clips
    from bench.memory import fishtune, run_measured

    data, codec = tmp / "data", tmp / "codec-real.pth"
    data.mkdir()
    count, seconds = (4, 30.0) if quick else (24, 184.0)
    for path in make_mixed_clips(data, count, seconds):
        path.with_suffix(".lab").write_text("hello\n")
    run_measured(fishtune("init-codec", str(codec), "--preset", "fish-speech-1.4", "--seed", "0"))
    return data, codec


REFERENCE_BATCH_SIZES = (16, 1)  # extract_vq.py's batching: 16 padded to the longest, and one file at a time


def _best_of(loops: list[dict]) -> dict:
    """``loop_vs_encoder`` results of several rounds as one: the best figure of each configuration."""
    best = dict(loops[0], repeats=len(loops), peak_rss_mb=max(r["peak_rss_mb"] for r in loops),
                codes_identical=all(r["codes_identical"] for r in loops))
    best["configs"] = {name: {m: max(r["configs"][name][m] for r in loops) for m in figure}
                       for name, figure in loops[0]["configs"].items()}
    return best


def extract_rows(data: Path, codec: Path, repeats: int, reference_python: str | None = None) -> dict:
    from bench.extract import loop_vs_encoder
    from bench.memory import fishtune, run_measured

    reference: dict[int, dict] = {}
    if reference_python:  # rounds of: ours (one sweep), the reference at each batch size
        rounds = []
        for _ in range(repeats):
            rounds.append(_in_fresh_process(loop_vs_encoder, str(data), 1))
            for size in REFERENCE_BATCH_SIZES:
                r = run_reference(reference_python, "extract", str(data), "--batch-size", str(size))
                if size not in reference or r["audio_s_per_s"] > reference[size]["audio_s_per_s"]:
                    reference[size] = r
        loop = _best_of(rounds)
    else:
        loop = _in_fresh_process(loop_vs_encoder, str(data), repeats)
    cli = run_measured(fishtune("extract", str(data), "--checkpoint-path", str(codec), "--device", "cpu", "--overwrite"))
    in_loop = loop["configs"]["loop"]["audio_s_per_s"]
    audio = loop["audio_seconds"]
    compared = {}
    if reference:
        best = max(reference.values(), key=lambda r: r["audio_s_per_s"])
        compared = {"reference": {f"batch{size}": r for size, r in reference.items()},
                    "reference_best_batch_size": best["batch_size"],
                    "loop_over_reference_best": round(in_loop / best["audio_s_per_s"], 3),
                    "loop_over_reference_best_per_cpu_s": round(
                        loop["configs"]["loop"]["audio_s_per_cpu_s"] / max(r["audio_s_per_cpu_s"] for r in reference.values()), 3)}
    return {"loop": loop, **compared,
            "loop_over_1_decode_process": round(in_loop / loop["configs"]["loop, 1 decode process"]["audio_s_per_s"], 3),
            "loop_over_encoder_alone": round(in_loop / loop["configs"]["encoder alone"]["audio_s_per_s"], 3),
            "cli": {"wall_s": round(cli["wall_s"], 2), "audio_s_per_s": round(audio / cli["wall_s"], 2),
                    "peak_rss_mib": round(cli["peak_mib"]), "over_loop": round(audio / cli["wall_s"] / in_loop, 3)}}


def startup_row(data: Path, codec: Path, repeats: int = 3) -> dict:
    """Fixed cost of a CLI run: ``fishtune extract`` with nothing to do (every file up to date:
    imports, codec load, planning) and ``fishtune extract --help`` (no torch), against
    ``python -c 'import torch'``; alternated, best of ``repeats`` each."""
    from bench.memory import fishtune, run_measured

    run_measured(fishtune("extract", str(data), "--checkpoint-path", str(codec), "--device", "cpu"))  # make it up to date
    bare, noop, help_ = [], [], []
    for _ in range(repeats):  # a burst of load hits all three alike
        bare.append(run_measured([sys.executable, "-c", "import torch"])["wall_s"])
        noop.append(run_measured(fishtune("extract", str(data), "--checkpoint-path", str(codec), "--device", "cpu"))["wall_s"])
        help_.append(run_measured(fishtune("extract", "--help"))["wall_s"])
    return {"import_torch_s": round(min(bare), 2), "cli_nothing_to_do_s": round(min(noop), 2),
            "above_import_torch_s": round(min(noop) - min(bare), 2), "cli_help_s": round(min(help_), 2)}


def demo_row() -> dict:
    from bench.flow import demo

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo.json"
        demo(out)
        return json.loads(out.read_text())


def table(figures: dict) -> str:
    lines = ["| row | figure | baseline (same run) | ratio |", "|---|---|---|---|"]
    if "train" in figures:
        t = figures["train"]
        ref = t["cases"]["reference-like"]
        for case in ("ours", "ours+checkpointing"):
            c = t["cases"][case]
            label = "default config" if case == "ours" else "checkpointing on"
            lines.append(f"| LoRA step {t['preset']} {c['shape']}, {label} | {c['tokens_per_s']:.0f} tok/s, "
                         f"{c['peak_rss_mib']:.0f} MiB peak | reference-like {ref['tokens_per_s']:.0f} tok/s, "
                         f"{ref['peak_rss_mib']:.0f} MiB | {t['over_reference_like'][case]:.2f}x |")
        if "reference" in t:
            r = t["reference"]
            for case, label in (("ours", "default config"), ("ours+checkpointing", "checkpointing on"),
                                ("reference-like", "reference-like")):
                c, ratio = t["cases"][case], t["over_reference"][case]
                lines.append(f"| LoRA step {t['preset']} {c['shape']}, {label}, vs the reference | "
                             f"{c['tokens_per_s']:.0f} tok/s, {c['peak_rss_mib']:.0f} MiB peak | Fish Speech 1.4.3 "
                             f"{r['tokens_per_s']:.0f} tok/s, {r['peak_rss_mib']:.0f} MiB | speed {ratio['speed']:.2f}x, "
                             f"peak RSS {ratio['peak_rss']:.2f}x |")
    if "extract" in figures:
        e = figures["extract"]
        c = e["loop"]["configs"]
        clips = f"{e['loop']['clips']} clips / {e['loop']['audio_seconds']:.0f} s"
        lines.append(f"| extract in the loop ({clips}, batch {e['loop']['batch_size']}) | "
                     f"{c['loop']['audio_s_per_s']:.1f} audio-s/s ({c['loop']['audio_s_per_cpu_s']:.1f} per CPU-s) | "
                     f"1 decode process {c['loop, 1 decode process']['audio_s_per_s']:.1f} | "
                     f"{e['loop_over_1_decode_process']:.2f}x |")
        if "reference" in e:
            refs = ", ".join(f"batch {r['batch_size']} {r['audio_s_per_s']:.1f} ({r['audio_s_per_cpu_s']:.1f} per CPU-s)"
                             for r in e["reference"].values())
            lines.append(f"| extract in the loop vs the reference (its batching, best of batch 16 / 1) | "
                         f"{c['loop']['audio_s_per_s']:.1f} audio-s/s | Fish Speech 1.4.3 {refs} | "
                         f"{e['loop_over_reference_best']:.2f}x ({e['loop_over_reference_best_per_cpu_s']:.2f}x per CPU-s) |")
        lines.append(f"| extract in the loop vs its ceiling | {c['loop']['audio_s_per_s']:.1f} audio-s/s | encoder alone "
                     f"{c['encoder alone']['audio_s_per_s']:.1f} | {e['loop_over_encoder_alone']:.2f}x |")
        lines.append(f"| `fishtune extract` as a whole | {e['cli']['wall_s']:.1f} s, {e['cli']['audio_s_per_s']:.1f} "
                     f"audio-s/s, {e['cli']['peak_rss_mib']} MiB peak | in the loop {c['loop']['audio_s_per_s']:.1f} | "
                     f"{e['cli']['over_loop']:.2f}x |")
    if "startup" in figures:
        s = figures["startup"]
        lines.append(f"| CLI start-up (`fishtune extract`, every file up to date) | {s['cli_nothing_to_do_s']:.2f} s, "
                     f"{s['above_import_torch_s']:+.2f} s above `import torch` | `import torch` {s['import_torch_s']:.2f} s | "
                     f"{s['cli_nothing_to_do_s'] / s['import_torch_s']:.2f}x |")
        lines.append(f"| CLI help (`fishtune extract --help`, no torch) | {s['cli_help_s']:.2f} s | `import torch` "
                     f"{s['import_torch_s']:.2f} s | {s['cli_help_s'] / s['import_torch_s']:.2f}x |")
    if "demo" in figures:
        d = figures["demo"]
        lines.append(f"| `fishtune demo` unchanged rerun | {d['rerun_s']:.1f} s | first run {d['first_s']:.1f} s | "
                     f"{d['rerun_over_first']:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny LM, 4 clips / 30 s, one repeat, no demo")
    parser.add_argument("--only", nargs="+", choices=ROWS, help="only these rows")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per case")
    parser.add_argument("--repeats", type=int, default=None, help="extraction sweeps (default 2, quick 1)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--reference-python", metavar="PATH",
                        help="interpreter of a venv with Fish Speech 1.4.3: train and extract also run the reference")
    args = parser.parse_args()
    if args.reference_python and not os.access(args.reference_python, os.X_OK):
        parser.error(f"--reference-python {args.reference_python}: not an executable file")
    rows = args.only or [r for r in ROWS if not (args.quick and r == "demo")]
    repeats = args.repeats or (1 if args.quick else 2)
    started = time.perf_counter()
    figures: dict = {"cpus": os.cpu_count(), "quick": args.quick, "load_average_1min_before": round(os.getloadavg()[0], 2),
                     "reference_python": args.reference_python}
    with tempfile.TemporaryDirectory() as tmp:
        if "extract" in rows or "startup" in rows:
            data, codec = make_data(Path(tmp), args.quick)
        for row in rows:
            print(f"== {row}", flush=True)
            if row == "train":
                figures["train"] = train_row(args.quick, args.steps, args.reference_python)
            elif row == "extract":
                figures["extract"] = extract_rows(data, codec, repeats, args.reference_python)
            elif row == "startup":
                figures["startup"] = startup_row(data, codec)
            elif row == "demo":
                figures["demo"] = demo_row()
    figures["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    print()
    print(table(figures))
    print(f"\n{figures['cpus']} CPUs; load average {figures['load_average_1min_before']} before, "
          f"{figures['load_average_1min_after']} after; {figures['wall_s']:.0f} s")
    if args.json:
        from fish_speech_core.files import atomic_write

        with atomic_write(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
