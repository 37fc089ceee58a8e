import os
import shutil
import time
from pathlib import Path

import pytest

from fishtune import projects
from fishtune.flows import watch as watch_module
from fishtune.flows.watch import ALL, EVENT, detect, speaker_listings, variable_name

DEMO = Path(__file__).parents[2] / "examples" / "demo-data"


def _touch(path: Path) -> None:
    later = path.stat().st_mtime + 100
    os.utime(path, (later, later))


def test_listings_change_only_with_the_speakers_files(tmp_path):
    shutil.copytree(DEMO, tmp_path / "data")
    before = speaker_listings(str(tmp_path / "data"))
    assert set(before) == {"alice", "bruno", "carmen"}
    assert speaker_listings(str(tmp_path / "data"), "bruno") == {"bruno": before["bruno"]}
    (tmp_path / "data" / "notes.txt").write_text("not speaker data")
    assert speaker_listings(str(tmp_path / "data")) == before
    (tmp_path / "data" / "bruno" / "bruno_999.lab").write_text("new")
    after = speaker_listings(str(tmp_path / "data"))
    assert after["bruno"] != before["bruno"] and {k: after[k] for k in ("alice", "carmen")} == {
        k: before[k] for k in ("alice", "carmen")
    }
    assert variable_name("s3://b/store", "voice-a").startswith("fishtune-watch-")
    assert variable_name("s3://b/store", "voice-a") != variable_name("s3://b/other", "voice-a")


def test_detect_hashes_only_changed_listings_and_ignores_a_touch(tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(DEMO, data)
    first, changed, fingerprint = detect(str(data), None, None)
    assert changed == ["alice", "bruno", "carmen"]  # a first look: every speaker is new
    assert detect(str(data), None, first) == (first, [], fingerprint)

    _touch(data / "carmen" / "carmen_000.lab")  # same bytes, new mtime: no change, but the new listing is kept
    touched, changed, same = detect(str(data), None, first)
    assert (changed, same) == ([], fingerprint)
    old, new = first["groups"]["carmen"].split(":"), touched["groups"]["carmen"].split(":")
    assert old[0] != new[0] and old[1] == new[1]
    hashed = []
    monkeypatch.setattr(watch_module, "hash_tree", lambda url, real=watch_module.hash_tree: hashed.append(url) or real(url))
    assert detect(str(data), None, touched)[1] == [] and hashed == []  # the kept listing: nothing re-read

    (data / "carmen" / "carmen_100.lab").write_text("a new take")
    grown, changed, grown_fp = detect(str(data), None, touched)
    assert changed == ["carmen"] and grown_fp != fingerprint and hashed == [str(data / "carmen")]
    shutil.rmtree(data / "alice")
    assert detect(str(data), None, grown)[1] == ["alice"]  # a removed speaker is a change too
    assert detect(str(data), "bruno", None)[1] == ["bruno"]  # a project of one speaker watches only that folder

    # Too many speakers for one Prefect Variable: one group for the project, still blind to a touch.
    monkeypatch.setattr(watch_module, "MAX_VARIABLE_VALUE_LENGTH", 100)
    whole, changed, _ = detect(str(data), None, grown)
    assert list(whole["groups"]) == [ALL] and changed == ["alice"]
    _touch(data / "bruno" / "bruno_000.lab")
    touched, changed, _ = detect(str(data), None, whole)
    assert changed == [] and touched != whole
    (data / "bruno" / "bruno_100.lab").write_text("another take")
    assert detect(str(data), None, touched)[1] == ["bruno", "carmen"]  # which speaker changed is not kept


def _events(since) -> list:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    with get_client(sync_client=True) as client:
        page = client.read_events(EventFilter(event=EventNameFilter(name=[EVENT]), occurred=EventOccurredFilter(since=since)), limit=50)
    return page.events


def _wait_for_events(since, count: int, timeout: float = 20.0) -> list:
    deadline = time.monotonic() + timeout
    while True:
        events = _events(since)
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


@pytest.mark.slow
def test_watch_emits_once_per_project_then_not_then_again_after_a_change(prefect_env, tmp_path):
    from prefect.types._datetime import now
    from prefect.variables import Variable

    from fishtune.flows.watch import watch

    data, store = tmp_path / "data", str(tmp_path / "store")
    shutil.copytree(DEMO, data)
    for name, speaker in (("watch-all", ""), ("watch-bruno", "bruno")):
        projects.create(store, name, {"data": str(data), "base": "b", "codec": "c", "speaker": speaker})
    since = now("UTC")
    # First look: one event per project (never one per speaker), naming every speaker it watches.
    assert watch(store) == {"watch-all": ["alice", "bruno", "carmen"], "watch-bruno": ["bruno"]}
    assert watch(store) == {}
    seen = Variable.get(variable_name(store, "watch-all"))
    _touch(data / "carmen" / "carmen_000.lab")
    assert watch(store) == {}  # a touch without a content change emits nothing ...
    kept = Variable.get(variable_name(store, "watch-all"))
    assert kept != seen and kept["groups"]["carmen"].split(":")[1] == seen["groups"]["carmen"].split(":")[1]  # ... and keeps the listing
    (data / "carmen" / "carmen_100.lab").write_text("a new take")
    assert watch(store, project="watch-bruno") == {}  # only that project: carmen is not its data
    assert watch(store) == {"watch-all": ["carmen"]}

    (tmp_path / "store" / "projects" / "broken.json").write_text("{")  # one broken spec: the others are still watched
    (data / "bruno" / "bruno_100.lab").write_text("another take")
    with pytest.raises(RuntimeError, match=r"could not check 1 project\(s\): broken: .*broken.json: not a project spec"):
        watch(store)

    events = [e for e in _wait_for_events(since, 5) if e.payload.get("storage") == store]
    mine = [(e.resource.id, e.payload["speakers"]) for e in sorted(events, key=lambda e: e.occurred)]
    assert len(mine) == 5, mine
    assert sorted(mine[:2]) == [("fishtune.project.watch-all", ["alice", "bruno", "carmen"]),
                                ("fishtune.project.watch-bruno", ["bruno"])]
    assert mine[2] == ("fishtune.project.watch-all", ["carmen"])
    assert sorted(mine[3:]) == [("fishtune.project.watch-all", ["bruno"]), ("fishtune.project.watch-bruno", ["bruno"])]
    first = next(e for e in events if e.resource.id == "fishtune.project.watch-all")
    assert first.resource["fishtune.project"] == "watch-all"
    assert (first.payload["project"], first.payload["storage"], first.payload["data"]) == ("watch-all", store, str(data))
    assert len(first.payload["fingerprint"]) == 16
