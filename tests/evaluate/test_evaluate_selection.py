"""Per-speaker preview plans on the demo data: a real prompt clip, held-out sentences, deterministic."""

import shutil
from pathlib import Path

import numpy as np

from fish_speech_core.evaluate.selection import (
    FALLBACK_SENTENCES,
    Clip,
    held_out_texts,
    plan_previews,
    plan_speaker,
    speaker_clips,
    text_key,
)
from fish_speech_core.finetune.data import load_groups, split_groups
from fish_speech_core.pack import pack

DEMO = Path(__file__).parents[2] / "examples" / "demo-data"


def test_speaker_clips_are_the_real_clips_with_their_transcripts():
    clips = speaker_clips(DEMO)
    assert sorted(clips) == ["alice", "bruno", "carmen"]
    on_disk = {p.parent.name: set() for p in DEMO.glob("*/*.lab")}
    for lab in DEMO.glob("*/*.lab"):
        on_disk[lab.parent.name].add(lab.stem)
    for speaker, items in clips.items():
        assert {c.audio.stem for c in items} == on_disk[speaker]
        for clip in items:
            assert clip.audio.is_file() and clip.audio.parent.name == speaker
            assert clip.text == clip.audio.with_suffix(".lab").read_text().strip()


def test_each_speaker_gets_a_real_prompt_and_held_out_sentences_not_the_prompts_deterministically():
    clips = speaker_clips(DEMO)
    plans = plan_previews(clips, sentences_per_speaker=3)
    assert [p.speaker for p in plans] == ["alice", "bruno", "carmen"]
    for plan in plans:
        own = {text_key(c.text): c for c in clips[plan.speaker]}
        assert plan.prompt in clips[plan.speaker]  # one real clip of this speaker, with its transcript
        assert plan.prompt.text == plan.prompt.audio.with_suffix(".lab").read_text().strip()
        assert len(plan.sentences) == 3 and plan.note is None
        assert len({text_key(s) for s in plan.sentences}) == 3
        for sentence in plan.sentences:  # transcripts of this speaker's other clips
            assert text_key(sentence) != text_key(plan.prompt.text)
            assert own[text_key(sentence)].audio != plan.prompt.audio
        assert plan.references and plan.prompt.audio not in plan.references
        assert all(p.parent.name == plan.speaker for p in plan.references)
    # the same clips in any order give the same plans
    shuffled = {name: list(reversed(items)) for name, items in reversed(list(clips.items()))}
    assert plan_previews(shuffled, sentences_per_speaker=3) == plans


def _pack_demo(tmp_path: Path) -> Path:
    """The demo transcripts with codes (as extract would write), packed like the flow's pack stage."""
    codes = tmp_path / "codes"
    rng = np.random.default_rng(0)
    for lab in sorted(DEMO.glob("*/*.lab")):
        (codes / lab.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(lab, codes / lab.parent.name / lab.name)
        np.save(codes / lab.parent.name / f"{lab.stem}.npy", rng.integers(0, 1000, size=(8, 30)))
    pack([codes], tmp_path / "shards")
    return tmp_path / "shards"


def test_held_out_sentences_come_from_the_trainers_validation_split(tmp_path):
    shards = _pack_demo(tmp_path)
    held = held_out_texts(shards, 0.3)
    # exactly the trainer's split (finetune.data.split_groups), per speaker
    val = split_groups(load_groups(shards), 0.3, "val")
    assert held == {g.name: {text_key(t) for i in g.items for t in i.texts} for g in val}
    assert 0 < sum(map(len, held.values())) < 28
    clips = speaker_clips(DEMO)
    for plan in plan_previews(clips, 3, held):
        val_texts = held.get(plan.speaker, set())
        assert text_key(plan.prompt.text) not in val_texts  # the prompt is a training clip
        first = [s for s in plan.sentences if text_key(s) in val_texts]
        assert plan.sentences[: len(first)] == tuple(first)  # validation sentences first
        assert len(first) == min(3, len(val_texts))
        assert plan.source.startswith("validation split" if first else "other clips")
    # nothing held out (or everything): no split to prefer
    assert held_out_texts(shards, 0.0) == {}


def test_too_few_clips_use_what_exists_and_say_so():
    clips = speaker_clips(DEMO)["carmen"]
    two = plan_speaker("carmen", clips[:2], sentences_per_speaker=3)
    assert two.prompt == clips[0] and two.sentences == (clips[1].text,)
    assert "only 1 transcript(s)" in two.note and two.references == (clips[1].audio,)
    one = plan_speaker("carmen", clips[:1], sentences_per_speaker=2)
    assert one.sentences == FALLBACK_SENTENCES[:2] and "generic" in one.note
    assert one.references == (clips[0].audio,)  # the only real clip
    same_text = [clips[0], Clip(clips[1].audio, clips[0].text)]  # a duplicate of the prompt's words
    assert plan_speaker("carmen", same_text, 3).sentences == FALLBACK_SENTENCES
