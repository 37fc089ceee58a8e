"""Run every stage benchmark and write one results file plus a Markdown table.

    python bench/run_all.py            # default: every bench in its short mode, incl. the real-size
                                       # memory steps and the 20x flow (< 15 min on 2 CPU cores)
    python bench/run_all.py --quick    # smoke run (~5 min): no real-size LM steps, flow 1x/5x only
    python bench/run_all.py --full     # the full benchmarks (much longer)
    python bench/run_all.py --only pack train --out bench/results

Each benchmark runs as its own subprocess with ``--json`` so its peak memory is its own; a
benchmark that fails or times out is recorded as such and the others still run. Writes
``<out>/<date>-<machine>.json`` (every figure, the machine, the exact commands) and the same
name with ``.md`` (the table for the README's Performance section).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's packages, not an installed copy

# name -> (quick arguments, full arguments); every bench also gets --json FILE.
BENCHES: dict[str, tuple[list[str], list[str]]] = {
    "normalize": (["--repeat", "2", "--workers", "2"], []),
    "extract": (["--quick"], []),
    "pack": (["--items", "400", "--repeats", "2"], []),
    "forward": (["--presets", "tiny", "--steps", "2"], []),
    "train": (["--quick"], []),
    "synthesize": (["--quick", "--presets", "tiny"], ["--presets", "tiny", "mid"]),
    "flow": (["--repeat", "1"], ["--repeat", "5"]),
    "memory": ([], ["--full"]),
    "scaling": (["--max-steps", "2", "--extract-seconds", "60"], []),
    "scale": (["--steps", "5"], []),
}
# --quick: these replace the default arguments.
QUICK: dict[str, list[str]] = {
    "memory": ["--skip-real"],
    "scaling": ["--scales", "1", "5", "--max-steps", "2", "--extract-seconds", "30", "--normalize-copies", "5"],
}


def machine_info() -> dict:
    info = {"cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(), "platform": platform.platform()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
        if model:
            info["cpu"] = model.group(1).strip()
        mem = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        if mem:
            info["memory_gib"] = round(int(mem.group(1)) / 2**20, 1)
    except OSError:
        pass
    import torch

    info["torch"] = torch.__version__
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    else:
        info["gpu"] = None
    return info


def machine_slug(info: dict) -> str:
    cpu = re.sub(r"\(r\)|\(tm\)|cpu|@.*$", "", info["cpu"].lower())
    cpu = re.sub(r"[^a-z0-9]+", "-", cpu).strip("-")[:40] or "cpu"
    gpu = "-" + re.sub(r"[^a-z0-9]+", "-", info["gpu"].split(",")[0].lower()).strip("-") if info["gpu"] else ""
    return f"{info['cores']}c-{cpu}{gpu}"


def run_bench(name: str, args: list[str], timeout: float) -> dict:
    """One benchmark as a subprocess; its figures, wall time, and the command to reproduce it."""
    script = ROOT / "bench" / f"{name}.py"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        command = [sys.executable, str(script.relative_to(ROOT)), *args, "--json", str(out)]
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        shown = " ".join(["python", *command[1:-2]])
        print(f"== {name}: {shown}", flush=True)
        started = time.perf_counter()
        try:
            proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            status = "ok" if proc.returncode == 0 and out.is_file() else f"failed (exit {proc.returncode})"
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            status, output = f"timed out after {timeout:g} s", (err.stdout or b"").decode(errors="replace")
        wall = time.perf_counter() - started
        figures = json.loads(out.read_text()) if out.is_file() else None
    print(output.rstrip()[-3000:] if status != "ok" else output.rstrip(), flush=True)
    print(f"-- {name}: {status} in {wall:.1f} s\n", flush=True)
    return {"command": shown, "status": status, "wall_s": round(wall, 2), "figures": figures,
            "output_tail": None if status == "ok" else output[-2000:]}


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def headline(name: str, f: dict | None) -> tuple[str, str, str]:
    """(our figure, ratio vs baseline in the same run, peak RSS) for the table."""
    if not f:
        return "-", "-", "-"
    if name == "normalize":
        o, b = f["ours"], f["baseline"]
        return (f"{o['audio_seconds_per_second']:.0f} audio-s/s at {o['workers']} workers "
                f"({o['files']} files)", f"{f['ratio']:.2f}x vs 1 worker",
                f"{max(o['peak_rss_mb'], b['peak_rss_mb']):.0f} MB")
    if name == "extract":
        best = max(f["configs"], key=lambda c: c["audio_s_per_s"])
        ratios = ", ".join(f"{v:.2f}x {k.split('_')[0]}" for k, v in f["ratios"].items())
        return (f"{best['audio_s_per_s']:.1f} audio-s/s (batch {best['batch_size']}, {best['order']}; real-size codec)",
                f"bucketed vs file-order: {ratios}", f"{max(c['peak_rss_mb'] for c in f['configs'])} MB")
    if name == "pack":
        small = f.get("small")
        return (f"{f['items']} items: {f['items_per_s_n_workers']:,} items/s at {f['workers']} workers, "
                f"{f['items_per_s_1_worker']:,} at 1" + (f"; {small['items']} items: {small['items_per_s_1_worker']:,} "
                f"items/s at 1 worker" if small else ""),
                f"{f['ratio']:.2f}x vs 1 worker (byte-identical: {f['byte_identical']})"
                + (f"; {small['items']} items: {small['ratio']:.2f}x (default now picks {small['default_workers']})"
                   if small else ""), "-")
    if name in ("forward", "train"):
        parts, ratios, rss = [], [], []
        for preset, r in f["presets"].items():
            ours = r.get("sdpa") or r.get("ours")
            parts.append(f"{preset} {ours['tokens_per_s']:,.0f} tok/s ({ours['shape']})")
            ratio = r.get("sdpa_over_explicit_speed") or r.get("ours_over_reference_like_speed")
            base = "explicit attention" if name == "forward" else "reference-like"
            ratios.append(f"{preset} {ratio:.2f}x vs {base}")
            rss.append(f"{ours['peak_rss_mib']:.0f} MiB")
        return "; ".join(parts), "; ".join(ratios), ", ".join(rss)
    if name == "synthesize":
        gens = "; ".join(f"{g['preset']} {g['cached_tps']:.1f} tok/s" for g in f["generation"])
        ratio = "; ".join(f"{g['preset']} {g['cached_over_uncached']:.2f}x vs no KV cache" for g in f["generation"])
        d = f["decode"]
        return f"{gens}; decode RTF {d['rtf']:.3f}", ratio, "-"
    if name == "flow":
        return (f"{f['items']} items: first run {f['first_s']:.1f} s, unchanged rerun {f['no_change_s']:.1f} s",
                f"{f['first_over_no_change']:.1f}x first vs cached rerun", "-")
    if name == "memory":
        steps = [r for r in f["rows"] if r["stage"] == "train step" and r["batch"] == 1 and not r.get("mmap_threshold")]
        fit = f.get("fits_24gb")
        figure = "; ".join(f"real-size 1x1024 step, checkpointing {'on' if r['checkpointing'] else 'off'}: "
                           f"{r['peak_mib']:,.0f} MiB" for r in steps) or "demo stages only"
        if fit:
            figure += f"; 24 GiB fits batch <= {fit['max_batch_at_1024']} x 1024 (checkpointing on)"
        ratio = (f"{f['no_checkpointing_over_checkpointing']:.2f}x checkpointing off vs on"
                 if f.get("no_checkpointing_over_checkpointing") else f"python+torch baseline {f['baseline_mib']} MiB")
        return figure, ratio, f"{max(r['peak_mib'] for r in f['rows']):,.0f} MiB"
    if name == "scaling":
        parts, ratios = [], []
        if "extract" in f:
            e = f["extract"]
            parts.append(f"extract {e['rows'][0]['audio_s_per_s']:.1f} -> {e['rows'][1]['audio_s_per_s']:.1f} audio-s/s "
                         f"at 1 -> 2 decode workers (real-size codec)")
            ratios.append(f"extract {e['workers_2_over_1']:.2f}x 2 vs 1 decode workers")
        if "normalize" in f:
            n = f["normalize"]
            parts.append(f"normalize {n['rows'][1]['audio_seconds_per_second']:.0f} audio-s/s at 2 workers")
            ratios.append(f"normalize {n['workers_2_over_1']:.2f}x 2 vs 1 workers")
        if "flow" in f:
            rows = f["flow"]["rows"]
            parts.append("flow " + ", ".join(f"{r['scale']}x {r['wall_s']:.0f} s" for r in rows))
            ratios.append("flow data stages " + ", ".join(f"{r['data_stages_over_1x']:.1f}x" for r in rows[1:])
                          + f" at {', '.join(str(r['scale']) + 'x' for r in rows[1:])} vs 1x")
        return "; ".join(parts), "; ".join(ratios), "-"
    return "-", "-", "-"


def memory_table(f: dict) -> list[str]:
    lines = ["", "### Peak memory (RSS) per stage", "",
             f"Each row is one fresh process; baseline: `python -c 'import torch'` = {f['baseline_mib']} MiB.", "",
             "| scope | stage | what | peak RSS MiB | vs baseline | wall s |", "|---|---|---|---|---|---|"]
    for r in f["rows"]:
        lines.append(f"| {r['scope']} | {r['stage']} | {r['what']} | {r['peak_mib']:,.0f} | "
                     f"{r['peak_mib'] / f['baseline_mib']:.1f}x | {r['wall_s']:.0f} |")
    fit = f.get("fits_24gb")
    if fit:
        from bench.memory import describe_fit

        lines += ["", f"What fits in 24 GiB (1 GiB kept free): {describe_fit(fit)}."]
    if f.get("mmap_threshold_over_default"):
        lines += ["", f"With `MALLOC_MMAP_THRESHOLD_=1048576` the 1x1024 checkpointed step's peak is "
                  f"{f['mmap_threshold_over_default']:.2f}x of the default allocator's (same run)."]
    return lines


def scaling_table(f: dict) -> list[str]:
    lines = ["", "### Scaling", ""]
    if "extract" in f:
        lines += ["| extract (real-size codec, batch 8, bucketed) | audio-s/s | wall s |", "|---|---|---|"]
        lines += [f"| {r['workers']} decode worker(s), torch threads {r['threads']} | {r['audio_s_per_s']:.1f} | {r['wall_s']:.1f} |"
                  for r in f["extract"]["rows"]]
        lines += ["", f"2 vs 1 decode workers: {f['extract']['workers_2_over_1']:.2f}x; default vs 1 torch thread: "
                  f"{f['extract']['threads_default_over_1']:.2f}x; codes identical: {f['extract']['codes_identical']}.", ""]
    if "normalize" in f:
        lines += ["| normalize | files | audio-s/s | wall s |", "|---|---|---|---|"]
        lines += [f"| {r['workers']} worker(s) | {r['files']} | {r['audio_seconds_per_second']:.0f} | {r['wall_seconds']:.1f} |"
                  for r in f["normalize"]["rows"]]
        lines += ["", f"2 vs 1 workers: {f['normalize']['workers_2_over_1']:.2f}x.", ""]
    if "flow" in f:
        stages = list(f["flow"]["rows"][0]["stages"])
        lines += [f"Finetune flow (tiny codec and LM, {f['flow']['max_steps']} training steps), demo data replicated:", "",
                  "| scale | clips | flow wall s | vs 1x | data stages s | vs 1x | " + " | ".join(stages) + " |",
                  "|---" * (6 + len(stages)) + "|"]
        lines += [f"| {r['scale']}x | {r['clips']} | {r['wall_s']:.1f} | {r['wall_over_1x']:.2f}x | {r['data_stages_s']:.1f} | "
                  f"{r['data_stages_over_1x']:.2f}x | " + " | ".join(f"{r['stages'].get(s, 0):.1f}" for s in stages) + " |"
                  for r in f["flow"]["rows"]]
    return lines


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Measured {report['date']} with `{report['command']}` on {m['cores']} cores of {m['cpu']}"
        f" ({m.get('memory_gib', '?')} GiB RAM), GPU: {m['gpu'] or 'none'}; torch {m['torch']}, "
        f"Python {m['python']}. Mode: {report['mode']}.",
        "",
        "| stage | figure | vs baseline (same run) | peak RSS | wall s | status |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report["benches"].items():
        figure, ratio, rss = headline(name, r["figures"]) if r["status"] == "ok" else ("-", "-", "-")
        lines.append(f"| {name} | {figure} | {ratio} | {rss} | {r['wall_s']:.0f} | {r['status']} |")
    lines += ["", "Reproduce one row: " + "; ".join(f"`{r['command']}`" for r in report["benches"].values())]
    for name, table in (("memory", memory_table), ("scaling", scaling_table)):
        r = report["benches"].get(name)
        if r and r["status"] == "ok" and r["figures"]:
            lines += table(r["figures"])
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="Full benchmarks instead of the short modes (an hour or more).")
    mode.add_argument("--quick", action="store_true", help="Smoke run: skip the real-size LM steps and the 20x flow.")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="Run only these benchmarks.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="Results folder.")
    parser.add_argument("--timeout", type=float, default=None,
                        help="Seconds per benchmark before it is stopped, a guard against hangs "
                        "(default 1800, 7200 with --full).")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="Only rewrite the Markdown table of an earlier results JSON (beside it) and print it.")
    args = parser.parse_args()
    if args.render:
        from fish_speech_core.files import atomic_write

        table = to_markdown(json.loads(args.render.read_text()))
        with atomic_write(args.render.with_suffix(".md"), "w") as handle:
            handle.write(table)
        print(table)
        return 0
    timeout = args.timeout or (7200.0 if args.full else 1800.0)
    names = [n for n in BENCHES if (args.only is None or n in args.only) and (ROOT / "bench" / f"{n}.py").is_file()]

    info = machine_info()
    started = time.perf_counter()
    def arguments(name: str) -> list[str]:
        if args.quick and name in QUICK:
            return QUICK[name]
        return BENCHES[name][1 if args.full else 0]

    benches = {name: run_bench(name, arguments(name), timeout) for name in names}
    now = datetime.now(timezone.utc)
    report = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "full" if args.full else "quick" if args.quick else "default",
        "command": "python bench/run_all.py" + (" --full" if args.full else " --quick" if args.quick else "")
        + (f" --only {' '.join(args.only)}" if args.only else ""),
        "machine": info,
        "total_wall_s": round(time.perf_counter() - started, 1),
        "benches": benches,
    }
    from fish_speech_core.files import atomic_write

    stem = f"{now.strftime('%Y-%m-%d')}-{machine_slug(info)}"
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out / f"{stem}.json", "w") as handle:
        json.dump(report, handle, indent=2)
    table = to_markdown(report)
    with atomic_write(args.out / f"{stem}.md", "w") as handle:
        handle.write(table)
    print(table)
    print(f"wrote {args.out / stem}.json and .md ({report['total_wall_s']:.0f} s)")
    return 0 if all(r["status"] == "ok" for r in benches.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
