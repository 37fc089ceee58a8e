"""Two ``fishtune finetune`` processes started at once on the same data and store.

Every stage is a SERIALIZABLE cached task with a file lock in the shared work folder: for each
stage one run computes and the other waits for the lock, then reads the first one's result.
Both runs succeed and point at the same artifacts and the same merged model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

DEMO = Path(__file__).parents[2] / "examples" / "demo-data"
STAGES = ["validate", "normalize", "extract", "pack", "train", "merge"]


def _run_both(commands: list[list[str]], env: dict, cwd, log: str, timeout: float) -> list[str]:
    """Start both commands at once, wait for both; their logs (each must exit 0)."""
    procs = [subprocess.Popen(command, env=env, cwd=cwd, stdout=open(cwd / f"{log}{i}.log", "wb"),
                              stderr=subprocess.STDOUT) for i, command in enumerate(commands)]
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    logs = [(cwd / f"{log}{i}.log").read_text(errors="replace") for i in range(len(procs))]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n\n".join(text[-3000:] for text in logs)
    return logs


@pytest.mark.slow
def test_two_finetune_runs_at_once_compute_each_stage_once(prefect_server, tmp_path):
    from fish_speech_core.codec import init_codec, save_codec
    from fish_speech_core.codec.config import FireflyConfig
    from fish_speech_core.lm.config import PRESETS
    from fish_speech_core.lm.init_base import init_base

    init_base(tmp_path / "base", PRESETS["tiny"], seed=0)
    save_codec(init_codec(FireflyConfig.from_name("tiny"), seed=0), tmp_path / "codec.pth")
    shutil.copytree(DEMO / "carmen", tmp_path / "data" / "carmen")
    store = tmp_path / "store"
    command = [
        sys.executable, "-m", "fishtune", "finetune", "--data", str(tmp_path / "data"), "--storage", str(store),
        "--project", "twice", "--base", str(tmp_path / "base"), "--codec", str(tmp_path / "codec.pth"),
        "--preset", "tiny", "--max-steps", "6", "--progress-every", "3",
    ]
    env = {**prefect_server.env, "COLUMNS": "200", "NO_COLOR": "1"}
    _run_both([command, command], env, tmp_path, "run", timeout=600)

    manifests = [json.loads(p.read_text()) for p in sorted(store.glob("runs/*/manifest.json"))]
    assert len(manifests) == 2 and all(m["status"] == "completed" for m in manifests)
    runs = [{s["stage"]: s for s in m["stages"]} for m in manifests]
    assert [list(r) for r in runs] == [STAGES, STAGES]
    for stage in STAGES:
        # computed by exactly one run; the other waited and reused it
        assert sorted(r[stage]["cached"] for r in runs) == [False, True], stage
        # the same artifact, not two copies
        assert runs[0][stage]["url"] == runs[1][stage]["url"], stage
    assert runs[0]["train"]["summary"]["final_step"] == 6 == runs[1]["train"]["summary"]["final_step"]
    versions = [p.name for p in (store / "models" / "twice").iterdir() if not p.name.startswith(".")]
    assert versions == [Path(runs[0]["merge"]["url"]).name]  # one model version, not two
    # one set of extracted codes and one packed shard set on the store
    assert len([p for p in (store / "extract").iterdir() if p.is_dir()]) == 1
    assert len([p for p in (store / "pack").iterdir() if p.is_dir()]) == 1


@pytest.mark.slow
def test_two_hosts_on_one_s3_store_share_redis_locks_and_compute_each_stage_once(
    prefect_server, moto_s3, s3_bucket, redis_server, tmp_path
):
    """Two finetune processes, each with its own work folder (so its own file locks: two hosts as far
    as locking goes), on the same S3 store with FISHTUNE_REDIS_URL set: each stage is computed once."""
    import os

    import fsspec
    import redis

    from fish_speech_core.codec import init_codec, save_codec
    from fish_speech_core.codec.config import FireflyConfig

    save_codec(init_codec(FireflyConfig.from_name("tiny"), seed=0), tmp_path / "codec.pth")
    shutil.copytree(DEMO / "carmen", tmp_path / "data" / "carmen")
    store = f"{s3_bucket}/store"
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}  # the moto endpoint
    env = {**prefect_server.env, **aws, "FISHTUNE_REDIS_URL": redis_server, "COLUMNS": "200", "NO_COLOR": "1"}
    calls_before = redis.Redis.from_url(redis_server).info("commandstats").get("cmdstat_set", {}).get("calls", 0)
    commands = [[sys.executable, "-m", "fishtune", "finetune", "--data", str(tmp_path / "data"), "--storage", store,
                 "--project", "hosts", "--codec", str(tmp_path / "codec.pth"), "--work-dir", str(tmp_path / f"host{i}")]
                for i in range(2)]
    logs = _run_both(commands, env, tmp_path, "host", timeout=300)
    assert not any("cache locks are per host" in log for log in logs)

    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    manifests = [json.loads(fs.cat_file(p)) for p in fs.glob(f"{store}/runs/*/manifest.json")]
    assert len(manifests) == 2 and all(m["status"] == "completed" for m in manifests)
    runs = [{s["stage"]: s for s in m["stages"]} for m in manifests]
    data_stages = ["validate", "normalize", "extract", "pack"]  # no --base: the run stops after pack
    assert [list(r) for r in runs] == [data_stages, data_stages]
    for stage in data_stages:
        assert sorted(r[stage]["cached"] for r in runs) == [False, True], stage  # one computed, one waited
        assert runs[0][stage]["url"] == runs[1][stage]["url"], stage
    # the work was done in one host's scratch folder only, with no lock files: the locks were in Redis
    worked = [i for i in range(2) if (tmp_path / f"host{i}" / "normalize").is_dir()]
    assert len(worked) == 1 and not list(tmp_path.glob("host*/locks/*"))
    client = redis.Redis.from_url(redis_server)
    assert client.info("commandstats")["cmdstat_set"]["calls"] - calls_before >= 2 * len(data_stages)
    assert client.keys("lock:*") == []  # every lock released
