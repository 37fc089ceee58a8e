"""bench/gpu.py is known to run before a GPU is at hand: its --smoke mode (tiny sizes, CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_smoke_mode_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["smoke"] is True and figures["device"]
    (train,) = figures["train"]["cases"]
    assert "error" not in train and train["tokens_per_s"] > 0 and train["loss"] > 0 and train["params_m"] > 0
    extract = figures["extract"]
    for dtype in ("fp32", "bf16"):
        assert "error" not in extract[dtype] and extract[dtype]["audio_s_per_s"] > 0 and extract[dtype]["files"] >= 1
    assert 0.0 <= extract["bf16_codes_equal_to_fp32"] <= 1.0
    generate = figures["generate"]["eager"]
    assert "error" not in generate and generate["new_tokens"] == 8 and generate["tokens_per_s"] > 0


def test_gpu_bench_without_cuda_says_how_to_run_it():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == "bench/gpu.py: no CUDA device here; run it on a GPU machine, or use --smoke"
