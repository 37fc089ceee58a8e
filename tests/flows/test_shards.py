"""Sharded extraction in-process (task bodies through ``.fn()``, no server): the split, the shard
keys, and the merge giving the bytes of one run. The child runs on a real server:
test_flows_server.py::test_extraction_shards_run_on_two_cuda_workers_and_a_lost_one_reruns_alone."""

import json
import shutil
from pathlib import Path

import pytest

from fish_speech_core import storage
from fish_speech_core.sharding import item_name, shard_of, split
from fish_speech_core.storage import Store
from fishtune.flows.config import FinetuneConfig
from fishtune.tasks.codec import EXTRACT, EXTRACT_SHARD, extract_shard_task, extract_task, merge_shards, shard_items
from fishtune.tasks.data import normalize_task
from fishtune.tasks.params import ExtractParams, ValidateParams

DEMO = Path(__file__).parents[2] / "examples" / "demo-data"
PARAMS = ExtractParams(num_workers=0)


def test_split_is_stable_and_one_new_clip_changes_only_its_shard():
    items = [f"{speaker}/{speaker}_{i:03d}" for speaker in ("alice", "bruno", "carmen") for i in range(1, 41)]
    for shards in (1, 2, 3, 8):
        parts = split(items, shards)
        assert sorted(i for part in parts for i in part) == sorted(items)  # each item exactly once
        assert all(part == sorted(part) for part in parts)
    # the assignment is frozen (sha256 of the name): a host, a run or a release never moves an item
    assert [shard_of(f"alice/alice_00{i}", 2) for i in range(1, 7)] == [0, 1, 0, 0, 0, 0]
    before, after = split(items, 4), split([*items, "dora/dora_001"], 4)
    changed = [k for k in range(4) if before[k] != after[k]]
    assert changed == [shard_of("dora/dora_001", 4)]
    assert (item_name("alice/alice_001.wav"), item_name("alice/alice_001.lab"), item_name("a/b.c.flac")) == (
        "alice/alice_001", "alice/alice_001", "a/b.c")


@pytest.fixture(scope="module")
def normalized(tmp_path_factory):
    """Two normalize artifacts of one store: a clip of each of two speakers, then the same plus one clip."""
    from fish_speech_core.codec import init_codec, save_codec
    from fish_speech_core.codec.config import FireflyConfig

    root = tmp_path_factory.mktemp("shards")
    data = root / "data"
    for speaker in ("alice", "carmen"):
        (data / speaker).mkdir(parents=True)
        for clip in sorted((DEMO / speaker).iterdir())[:2]:  # audio + transcript
            shutil.copy(clip, data / speaker / clip.name)
    codec = root / "codec-tiny.pth"
    save_codec(init_codec(FireflyConfig.from_name("tiny"), seed=0), codec)
    store = str(root / "store")
    first = normalize_task.fn(str(data), store, work_dir=str(root / "work"))
    for clip in sorted((DEMO / "alice").iterdir())[2:4]:
        shutil.copy(clip, data / "alice" / clip.name)
    second = normalize_task.fn(str(data), store, work_dir=str(root / "work"))
    return str(codec), first["url"], second["url"]


def _files(store: str, stage: str, key: str) -> dict[str, bytes]:
    art = Store(store).lookup(stage, key)
    return {rel: Path(art.file_url(rel)).read_bytes() for rel in art.files}


def test_shards_merge_to_the_bytes_of_one_run_and_shards_of_other_data_are_refused(normalized, tmp_path):
    codec, url, grown = normalized
    one = extract_task.fn(url, codec, str(tmp_path / "k1"), PARAMS, work_dir=str(tmp_path / "w1"))
    expected = _files(str(tmp_path / "k1"), "extract", one["key"])
    assert len([r for r in expected if r.endswith(".npy")]) == 2 and len(expected) == 2 * 3 + 1  # npy, sidecar, lab; summary
    # the summary holds only what the content decides (no timings, no per-run counts)
    assert json.loads(expected["extract-summary.json"]).keys() == {"files", "audio_seconds"}

    store = str(tmp_path / "k2")
    results = [extract_shard_task.fn(url, codec, store, i, 2, PARAMS, work_dir=str(tmp_path / "w2")) for i in range(2)]
    assert [(r["summary"]["files"], r["summary"]["extracted"]) for r in results] == [(1, 1), (1, 1)]
    keys = [r["key"] for r in results]
    merged = merge_shards.fn(url, codec, store, PARAMS, keys, {"extracted": 2, "skipped": 0})
    assert merged["key"] == one["key"]  # K is not in the key: a K=2 run after a K=1 run is a cache hit
    assert _files(store, "extract", merged["key"]) == expected  # every file, byte for byte
    assert merged["summary"] == {**one["summary"], "shards": 2}
    again = merge_shards.fn(url, codec, store, PARAMS, [])  # published: nothing to merge, the artifact is reused
    assert again["url"] == merged["url"] and again["summary"]["reused_artifact"]

    # the shards of the 2-clip data are not the shards of the 3-clip data: refused, nothing published
    with pytest.raises(ValueError, match=r"1 item\(s\) of .+ are in no shard, e.g. alice/alice_001"):
        merge_shards.fn(grown, codec, store, PARAMS, keys)
    assert Store(store).lookup("extract", EXTRACT.key({"normalized_url": grown, "codec": codec, "params": PARAMS})) is None


def test_a_new_clip_changes_only_its_shards_key(normalized):
    codec, url, grown = normalized
    [added] = {item_name(r) for r in storage.file_hashes(grown)} - {item_name(r) for r in storage.file_hashes(url)}
    for shards in (2, 3):
        keys = lambda u: [EXTRACT_SHARD.key({"normalized_url": u, "codec": codec, "shard": i, "shards": shards,
                                             "params": PARAMS}) for i in range(shards)]
        before, after = keys(url), keys(grown)
        assert [i for i in range(shards) if before[i] != after[i]] == [shard_of(added, shards)]
    # a shard's files: its clips' audio and transcripts only (the normalize reports are no item)
    files = shard_items(grown, shard_of(added, 2), 2, PARAMS.text_extension)
    assert {item_name(r) for r in files} == {"alice/alice_000", "alice/alice_001"} and len(files) == 4
    assert all(r.endswith((".wav", ".flac", ".mp3", ".lab")) for r in files)
    # the same items make the same shard whatever K split them: here K=3's shard 1 holds all of K=1's
    key = lambda k, i: EXTRACT_SHARD.key({"normalized_url": url, "codec": codec, "shard": i, "shards": k, "params": PARAMS})
    assert shard_items(url, 1, 3, ".lab") == shard_items(url, 0, 1, ".lab") and key(3, 1) == key(1, 0)


def test_shards_need_a_pool_and_data_shards_only_on_large_data():
    from fish_speech_core.defaults import DATA_ITEMS_PER_SHARD as PER, DATA_MAX_SHARDS as MOST

    with pytest.raises(ValueError, match="extract_shards 2 needs gpu_pool"):
        FinetuneConfig(data="/tmp/d", extract_shards=2)
    with pytest.raises(ValueError, match="data_shards 2 needs cpu_pool"):
        FinetuneConfig(data="/tmp/d", data_shards=2, gpu_pool="cuda")
    assert FinetuneConfig(data="/tmp/d", extract_shards=2, gpu_pool="cuda").extract_shards == 2
    assert FinetuneConfig(data="/tmp/d", extract_shards=1).extract_shards == 1
    # K for validate / normalize: the config's with a cpu pool, else one per PER clips (at most MOST); 1 without a pool
    pool = FinetuneConfig(data="/tmp/d", cpu_pool="cpu")
    assert [pool.data_shards_for(n) for n in (0, 1, PER, PER + 1, 3 * PER, 10**9)] == [1, 1, 1, 2, 3, MOST]
    assert FinetuneConfig(data="/tmp/d").data_shards_for(10**9) == 1
    assert pool.model_copy(update={"data_shards": 2}).data_shards_for(1) == 2



def _two_speakers_and_an_orphan(data: Path) -> Path:
    """alice's and carmen's first 2 clips (shards 1 and 2 of 2), and a transcript without audio."""
    for speaker in ("alice", "carmen"):
        (data / speaker).mkdir(parents=True)
        for clip in sorted((DEMO / speaker).iterdir())[:4]:  # audio + transcript
            shutil.copy(clip, data / speaker / clip.name)
    shutil.copy(DEMO / "carmen" / "carmen_000.lab", data / "carmen" / "orphan.lab")  # rejected: no audio
    return data

def test_normalize_shards_merge_to_the_bytes_of_one_run(tmp_path):
    """Normalize on K=2 shards (task bodies in-process; the child runs: test_flows_server.py::
    test_normalize_shards_run_on_the_cpu_pool): the merged artifact is one run's, key and bytes."""
    from fishtune.tasks.data import NORMALIZE, NORMALIZE_SHARD, data_shard_files, merge_normalize_shards, normalize_shard_task

    data = _two_speakers_and_an_orphan(tmp_path / "data")
    # each file once, with its item (audio + transcript in one shard)
    parts = [data_shard_files(str(data), i, 2) for i in range(2)]
    assert sorted(r for p in parts for r in p) == sorted(storage.file_hashes(str(data)))
    assert all(item_name(r) in {item_name(o) for o in p if o != r} or r == "carmen/orphan.lab" for p in parts for r in p)

    one = normalize_task.fn(str(data), str(tmp_path / "k1"), work_dir=str(tmp_path / "w1"))
    expected = _files(str(tmp_path / "k1"), "normalize", one["key"])
    assert len(expected) == 4 * 2 + 2  # audio + transcript of the 4 accepted clips; the report and summary
    assert json.loads(expected["normalize-report.json"]).keys() == {"settings", "files", "audio_seconds", "clipped"}

    store = str(tmp_path / "k2")
    shards = [normalize_shard_task.fn(str(data), store, i, 2, work_dir=str(tmp_path / "w2")) for i in range(2)]
    assert sorted(r["summary"]["files"] for r in shards) == [2, 2] and all(r["summary"]["written"] == 2 for r in shards)
    keys = [r["key"] for r in shards]
    merged = merge_normalize_shards.fn(str(data), store, shard_keys=keys, counts={"written": 4, "skipped": 0})
    assert merged["key"] == one["key"]  # K is not in the key: a K=1 run after a K=2 run is a cache hit
    assert _files(store, "normalize", merged["key"]) == expected  # every file, byte for byte
    assert merged["summary"] == {**one["summary"], "shards": 2}
    assert normalize_task.fn(str(data), store, work_dir=str(tmp_path / "w3"))["summary"]["reused_artifact"]
    # a shard's key is its files' content: the same items make the same shard whatever K split them
    assert NORMALIZE_SHARD.key({"data_dir": str(data), "shard": 0, "shards": 1}) != keys[0]
    # one shard missing: refused naming an item, nothing published
    (data / "alice" / "new.lab").write_text("x")
    with pytest.raises(ValueError, match=r"item\(s\) of .+ are in no shard"):
        merge_normalize_shards.fn(str(data), store, shard_keys=keys)
    assert Store(store).lookup("normalize", NORMALIZE.key({"data_dir": str(data)})) is None


def test_validate_shards_merge_to_the_bytes_of_one_run(tmp_path):
    """Validate on K=2 shards (task bodies in-process; the child runs: test_flows_server.py::
    test_normalize_shards_run_on_the_cpu_pool): the rows merged in one run's order, the report
    rebuilt from them: one run's artifact, key and bytes, which a K=1 run then reuses."""
    from fishtune.tasks.data import VALIDATE, data_items, merge_validate_shards, validate_shard_task, validate_task

    data = _two_speakers_and_an_orphan(tmp_path / "data")
    (data / "alice" / "alice_000.lab").write_text("")  # rejected: empty transcript
    assert data_items(str(data)) == 5

    one = validate_task.fn(str(data), str(tmp_path / "k1"))
    expected = _files(str(tmp_path / "k1"), "validate", one["key"])
    assert set(expected) == {"manifest.parquet", "report.md", "summary.json"}
    assert (one["summary"]["accepted"], one["summary"]["rejected"]) == (3, 2)
    assert str(data) not in "".join(b.decode("utf-8", "replace") for b in expected.values())  # no host path

    store = str(tmp_path / "k2")
    shards = [validate_shard_task.fn(str(data), store, i, 2) for i in range(2)]
    assert sorted(r["summary"]["files"] for r in shards) == [2, 3] and all(r["summary"]["reused"] == 0 for r in shards)
    keys = [r["key"] for r in shards]
    merged = merge_validate_shards.fn(str(data), store, shard_keys=keys, counts={"checked": 5, "reused": 0})
    assert merged["key"] == one["key"]  # K is not in the key: a K=1 run after a K=2 run is a cache hit
    assert _files(store, "validate", merged["key"]) == expected  # every file, byte for byte
    assert merged["summary"] == {**{k: v for k, v in one["summary"].items() if k != "reused_artifact"},
                                 "checked": 5, "reused": 0, "shards": 2, "reused_artifact": False}
    assert validate_task.fn(str(data), store)["summary"]["reused_artifact"]
    # a rerun of a shard reuses its artifact: all its files count as reused
    assert validate_shard_task.fn(str(data), store, 0, 2)["summary"]["reused"] == shards[0]["summary"]["files"]
    # one shard missing: refused naming an item, nothing published
    (data / "alice" / "new.lab").write_text("x")
    with pytest.raises(ValueError, match=r"item\(s\) of .+ are in no shard"):
        merge_validate_shards.fn(str(data), store, shard_keys=keys)
    assert Store(store).lookup("validate", VALIDATE.key({"data_dir": str(data), "params": ValidateParams()})) is None
