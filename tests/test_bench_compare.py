"""bench/compare.py's reference rows and bench/reference.py's guard, without the reference installed."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.compare import _best_of, table  # noqa: E402


def _loop(wall: float, cpu: float, peak: int) -> dict:
    figure = {"audio_s_per_s": wall, "audio_s_per_cpu_s": cpu}
    return {"clips": 4, "audio_seconds": 30.0, "repeats": 1, "decode_workers": 1, "batch_size": 1,
            "configs": {"loop": figure, "loop, 1 decode process": figure, "encoder alone": figure},
            "peak_rss_mb": peak, "codes_identical": True}


def test_best_of_rounds_keeps_each_configurations_best_figure():
    best = _best_of([_loop(10.0, 8.0, 900), _loop(12.0, 7.0, 950)])
    assert best["repeats"] == 2 and best["peak_rss_mb"] == 950
    assert best["configs"]["loop"] == {"audio_s_per_s": 12.0, "audio_s_per_cpu_s": 8.0}


def test_table_sets_ours_beside_the_reference():
    case = {"shape": "2x1024", "tokens_per_s": 150.0, "peak_rss_mib": 3000.0}
    figures = {
        "train": {"preset": "mid", "cases": {"ours": case, "ours+checkpointing": case, "reference-like": case},
                  "over_reference_like": {"ours": 1.0, "ours+checkpointing": 1.0, "reference-like": 1.0},
                  "reference": {"tokens_per_s": 100.0, "peak_rss_mib": 3200.0},
                  "over_reference": {k: {"speed": 1.5, "peak_rss": 0.94} for k in ("ours", "ours+checkpointing", "reference-like")}},
        "extract": {"loop": _loop(23.0, 15.0, 900), "loop_over_1_decode_process": 1.0, "loop_over_encoder_alone": 1.0,
                    "cli": {"wall_s": 6.0, "audio_s_per_s": 5.0, "peak_rss_mib": 1000, "over_loop": 0.2},
                    "reference": {"batch16": {"batch_size": 16, "audio_s_per_s": 10.0, "audio_s_per_cpu_s": 6.0},
                                  "batch1": {"batch_size": 1, "audio_s_per_s": 20.0, "audio_s_per_cpu_s": 12.0}},
                    "loop_over_reference_best": 1.15, "loop_over_reference_best_per_cpu_s": 1.25},
    }
    text = table(figures)
    assert ("| LoRA step mid 2x1024, default config, vs the reference | 150 tok/s, 3000 MiB peak | "
            "Fish Speech 1.4.3 100 tok/s, 3200 MiB | speed 1.50x, peak RSS 0.94x |") in text
    assert "batch 16 10.0 (6.0 per CPU-s), batch 1 20.0 (12.0 per CPU-s) | 1.15x (1.25x per CPU-s) |" in text


def test_reference_driver_outside_the_reference_venv_says_where_to_run_it():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "reference.py"), "train", "--preset", "tiny"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("bench/reference.py: no fish_speech (Fish Speech 1.4.3) in this interpreter")


def test_compare_rejects_a_reference_python_that_is_not_there(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "compare.py"), "--reference-python", str(tmp_path / "python")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "not an executable file" in done.stderr.strip().splitlines()[-1]
