import shutil
import time
from pathlib import Path

import pytest

from fishtune.flows.watch import EVENT, fingerprints, variable_name

DEMO = Path(__file__).parents[2] / "examples" / "demo-data"


def test_fingerprints_change_only_with_the_speakers_files(tmp_path):
    shutil.copytree(DEMO, tmp_path / "data")
    before = fingerprints(str(tmp_path / "data"))
    assert set(before) == {"alice", "bruno", "carmen"}
    (tmp_path / "data" / "notes.txt").write_text("not speaker data")
    assert fingerprints(str(tmp_path / "data")) == before
    (tmp_path / "data" / "bruno" / "bruno_999.lab").write_text("new")
    after = fingerprints(str(tmp_path / "data"))
    assert after["bruno"] != before["bruno"] and {k: after[k] for k in ("alice", "carmen")} == {
        k: before[k] for k in ("alice", "carmen")
    }
    assert variable_name("s3://b/raw", "Zoë K") .startswith("fishtune-fp-")


def _landed_events(since) -> list:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    with get_client(sync_client=True) as client:
        page = client.read_events(EventFilter(event=EventNameFilter(name=[EVENT]), occurred=EventOccurredFilter(since=since)), limit=50)
    return page.events


def _wait_for_events(since, count: int, timeout: float = 20.0) -> list:
    deadline = time.monotonic() + timeout
    while True:
        events = _landed_events(since)
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


@pytest.mark.slow
def test_watch_emits_once_then_not_then_again_after_a_change(prefect_env, tmp_path):
    from prefect.types._datetime import now

    from fishtune.flows.watch import watch

    data = tmp_path / "data"
    shutil.copytree(DEMO, data)
    since = now("UTC")
    assert watch(str(data), project="watch-test") == ["alice", "bruno", "carmen"]
    assert watch(str(data), project="watch-test") == []
    (data / "carmen" / "carmen_100.lab").write_text("a new take")
    assert watch(str(data), project="watch-test") == ["carmen"]
    events = _wait_for_events(since, 4)
    mine = [e for e in events if e.payload.get("data") == str(data)]
    assert sorted(e.resource["fishtune.speaker"] for e in mine) == ["alice", "bruno", "carmen", "carmen"]
    assert {e.resource.id for e in mine} == {"fishtune.speaker.alice", "fishtune.speaker.bruno", "fishtune.speaker.carmen"}
    assert all(e.payload["project"] == "watch-test" for e in mine)
