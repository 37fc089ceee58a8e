"""render_previews + score_previews end to end on the tiny offline models."""

import json
import subprocess

import pytest
import soundfile as sf

from fish_speech_core.codec import init_codec, save_codec
from fish_speech_core.codec.config import FireflyConfig
from fish_speech_core.evaluate.previews import MANIFEST, render_previews, score_previews

from tests.test_synth_cli import make_speaking_tiny

SENTENCES = ["Hello there, how are you?", "This is the second test sentence."]


@pytest.mark.slow
def test_render_previews_writes_one_wav_per_sentence_and_caches_by_content(tmp_path):
    lm = make_speaking_tiny(tmp_path)
    codec = tmp_path / "codec.pth"
    save_codec(init_codec(FireflyConfig.from_name("tiny"), seed=0), codec)
    prompt = tmp_path / "prompt.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(prompt), "This is my voice."], check=True)
    out = tmp_path / "previews" / "base"
    args = dict(model_dir=lm, lora_ckpt=None, codec=codec, sentences=SENTENCES,
                prompt_audio=prompt, prompt_text="This is my voice.", out_dir=out, seed=0,
                max_new_tokens=48, device="cpu")
    paths = render_previews(**args)
    assert sorted(p.name for p in out.iterdir()) == ["00.wav", "01.wav", MANIFEST]
    assert [p.name for p in paths] == ["00.wav", "01.wav"]
    for path in paths:
        audio, rate = sf.read(path)
        assert rate == 44100 and audio.size > 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert [f["text"] for f in manifest["files"]] == SENTENCES

    before = {p: p.stat().st_mtime_ns for p in paths}
    assert render_previews(**args) == paths  # cached: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in paths} == before
    render_previews(**{**args, "seed": 1})  # another key: rendered again
    assert json.loads((out / MANIFEST).read_text())["seed"] == 1

    class Flat:  # any SpeakerEmbedder fits; a constant one keeps this test fast
        def embed(self, audio, rate):
            import numpy as np
            return np.ones(4) / 2.0

    scores = score_previews(paths, SENTENCES, [prompt], Flat())
    assert len(scores["files"]) == 2 and scores["similarity"] == pytest.approx(1.0)
    json.dumps(scores)  # small and JSON-able, for the flow's task result
