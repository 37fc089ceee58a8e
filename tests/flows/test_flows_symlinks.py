"""The flow's content keys follow symlinks (issue 12): a re-pointed link is a cache miss, never the old clip."""

from __future__ import annotations

import io

import pytest
import soundfile

from fish_speech_core.storage import Store
from fishtune.flows.config import FinetuneConfig
from tests.audio_factory import write_clip


@pytest.mark.slow
def test_re_pointed_link_is_a_miss_and_the_new_clip_is_used(prefect_env, tmp_path):
    from fishtune.flows.finetune import finetune

    data = tmp_path / "data"
    write_clip(data / ".clips" / "one.wav", seconds=1.0, seed=1, text=None)  # hidden: not a speaker
    write_clip(data / ".clips" / "two.wav", seconds=2.0, seed=2, text=None)
    write_clip(data / "spk" / "b.wav", seed=3)
    (data / "spk" / "a.wav").symlink_to(data / ".clips" / "one.wav")
    (data / "spk" / "a.lab").write_text("hello there")
    config = FinetuneConfig(data=str(data), storage=str(tmp_path / "store"), project="links")  # stops after normalize

    first = {s["stage"]: s for s in finetune(config)["stages"]}
    (data / "spk" / "a.wav").unlink()
    (data / "spk" / "a.wav").symlink_to(data / ".clips" / "two.wav")
    second = {s["stage"]: s for s in finetune(config)["stages"]}

    assert set(second) == {"validate", "normalize"}
    assert not any(s["cached"] for s in second.values()), second
    assert second["normalize"]["key"] != first["normalize"]["key"]
    store = Store(config.storage)
    artifact = store.lookup("normalize", second["normalize"]["key"])
    clip = store.read_bytes(f"normalize/{artifact.key}/spk/a.wav")
    assert soundfile.info(io.BytesIO(clip)).duration == pytest.approx(2.0)  # the new clip, not the old one
