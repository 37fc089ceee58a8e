"""Task bodies through ``.fn()`` (no Prefect server): artifacts, keys and reuse."""

import shutil
from pathlib import Path

import numpy as np

from fish_speech_core.formats.protos import iter_text_data
from fish_speech_core.storage import Store
from fishtune.tasks.data import normalize_task, pack_task, validate_task

DEMO = Path(__file__).parents[2] / "examples" / "demo-data"


def test_validate_and_normalize_fn_publish_and_reuse_artifacts(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(DEMO / "carmen", data / "carmen")
    store = Store(str(tmp_path / "store"))
    v = validate_task.fn(str(data), store.root)
    assert v["summary"]["accepted"] == 8 and v["summary"]["rejects_by_reason"] == {}
    assert set(store.lookup("validate", v["key"]).files) == {"manifest.parquet", "summary.json", "report.md"}
    reused = validate_task.fn(str(data), store.root)  # the artifact is reused, not recomputed
    assert reused["summary"].pop("reused_artifact") and not v["summary"].pop("reused_artifact") and reused == v
    n = normalize_task.fn(str(data), store.root, work_dir=str(tmp_path / "work"))
    assert (n["summary"]["written"], n["summary"]["files"]) == (8, 8)
    again = normalize_task.fn(str(data), store.root, work_dir=str(tmp_path / "work"))
    assert again["key"] == n["key"] and again["summary"]["reused_artifact"]
    # the published folder holds exactly the accepted items (audio + transcript) and the report
    art = store.lookup("normalize", n["key"])
    expected = {f"carmen/{p.name}" for p in (DEMO / "carmen").iterdir()} | {"normalize-report.json", "summary.json"}
    assert set(art.files) == expected


def test_pack_fn_publishes_shards_readable_as_text_data(tmp_path):
    rng = np.random.default_rng(0)
    codes = tmp_path / "codes"
    for speaker, n in (("alice", 3), ("bruno", 2)):
        for i in range(n):
            (codes / speaker).mkdir(parents=True, exist_ok=True)
            (codes / speaker / f"{i}.lab").write_text(f"sentence {i} of {speaker}")
            np.save(codes / speaker / f"{i}.npy", rng.integers(0, 1024, size=(8, 20 + i)).astype(np.int64))
    store = Store(str(tmp_path / "store"))
    p = pack_task.fn(str(codes), store.root)
    summary = dict(p["summary"])
    assert summary.pop("reused_artifact") is False
    assert summary.pop("bytes") == sum(Path(u).stat().st_size for u in p["shards"]) > 0
    assert summary == {"speakers": 2, "sentences": 5, "frames": 3 * 20 + 3 + 2 * 20 + 1, "rejects": 0}
    records = list(iter_text_data([Path(u) for u in p["shards"]]))
    assert [(r.name, len(r.sentences)) for r in records] == [("alice", 3), ("bruno", 2)]
    assert pack_task.fn(str(codes), store.root)["key"] == p["key"]
