"""Run every stage benchmark and write one results file plus a Markdown table.

    python bench/run_all.py            # quick modes (a few minutes on 2 CPU cores)
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

# name -> (quick arguments, full arguments); every bench also gets --json FILE.
BENCHES: dict[str, tuple[list[str], list[str]]] = {
    "normalize": (["--repeat", "2", "--workers", "2"], []),
    "extract": (["--quick"], []),
    "pack": (["--items", "400", "--repeats", "2"], []),
    "forward": (["--presets", "tiny", "--steps", "2"], []),
    "train": (["--quick"], []),
    "synthesize": (["--quick", "--presets", "tiny"], ["--presets", "tiny", "mid"]),
    "flow": (["--repeat", "1"], ["--repeat", "5"]),
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
        return (f"{best['audio_s_per_s']:.1f} audio-s/s (batch {best['batch_size']}, {best['order']}; tiny codec)",
                f"bucketed vs file-order: {ratios}", f"{max(c['peak_rss_mb'] for c in f['configs'])} MB")
    if name == "pack":
        return (f"{f['items_per_s_n_workers']:,} items/s at {f['workers']} workers",
                f"{f['ratio']:.2f}x vs 1 worker (byte-identical: {f['byte_identical']})", "-")
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
    return "-", "-", "-"


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
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="Full benchmarks instead of the quick modes.")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="Run only these benchmarks.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="Results folder.")
    parser.add_argument("--timeout", type=float, default=None,
                        help="Seconds per benchmark before it is stopped (default 300 quick, 3600 full).")
    args = parser.parse_args()
    timeout = args.timeout or (3600.0 if args.full else 300.0)
    names = [n for n in BENCHES if (args.only is None or n in args.only) and (ROOT / "bench" / f"{n}.py").is_file()]

    info = machine_info()
    started = time.perf_counter()
    benches = {name: run_bench(name, BENCHES[name][1 if args.full else 0], timeout) for name in names}
    now = datetime.now(timezone.utc)
    report = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "full" if args.full else "quick",
        "command": "python bench/run_all.py" + (" --full" if args.full else "")
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
