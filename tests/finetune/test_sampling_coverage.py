"""The default sampler trains on every sentence of every speaker (issue 13); the reference rule does not.

Tolerance (stated in docs/train.md, Sampling): over the samples drawn, every training sentence
appears, and every sentence's count lies between LOW and HIGH times the uniform count (total
sentence appearances / sentences). Counts are what the collator keeps: a sentence cut off at
``max_length`` is not counted.
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from fish_speech_core.finetune.data import (
    Collator,
    SampleBuilder,
    SamplingConfig,
    TextSemanticDataset,
    load_groups,
    number_items,
)
from fish_speech_core.formats.protos import ShardWriter, make_text_data
from fish_speech_core.tokenizer import FishTokenizer

LOW, HIGH = 0.4, 2.0
WORDS = "the a quick brown fox jumps over lazy dog hello world voice speech model train".split()
TINY, RECIPE = 256, 4096  # max_length of the tiny preset and of the Fish Speech 1.4 recipe
# samples per case: a recipe-length sample holds ~50 of these sentences, a tiny one ~4
SAMPLES = {TINY: 400, RECIPE: 40}


@pytest.fixture(scope="module")
def tokenizer(reference):
    return FishTokenizer.from_dir(reference / "tokenizer")


def write_speaker(folder, clips: int, seed: int = 0, name: str = "SPK"):
    """One speaker of ``clips`` sentences, realistic spread: 3-11 words, 20-119 code frames."""
    rng = np.random.default_rng(seed)
    sentences = [(" ".join(rng.choice(WORDS, int(rng.integers(3, 12)))),
                  rng.integers(0, 1024, (8, int(rng.integers(20, 120)))).tolist()) for _ in range(clips)]
    with ShardWriter(folder, shard_size_mb=1.0) as writer:
        writer.write(make_text_data(name, sentences))
    return folder


def counts(tokenizer, groups, max_length: int, mode: str, samples: int, seed: int = 0) -> list[int]:
    builder = SampleBuilder(tokenizer, groups, SamplingConfig(max_length=max_length, mode=mode))
    collate = Collator.from_tokenizer(tokenizer, max_length)
    rng, seen = random.Random(seed), Counter()
    for _ in range(samples):
        seen.update(collate([builder.sample(rng)])["sentences"].tolist())
    return [seen[i] for i in range(sum(len(g.items) for g in groups))]


@pytest.mark.parametrize("max_length", [TINY, RECIPE])
@pytest.mark.parametrize("clips", [3, 21, 150])
def test_default_sampling_covers_every_sentence_near_uniformly(tmp_path, tokenizer, clips, max_length):
    groups = number_items(load_groups(write_speaker(tmp_path, clips)))
    got = counts(tokenizer, groups, max_length, "cover", SAMPLES[max_length])
    uniform = sum(got) / clips
    assert min(got) > 0, f"sentences never sampled: {[i for i, n in enumerate(got) if n == 0]}"
    assert LOW * uniform <= min(got) and max(got) <= HIGH * uniform, (min(got) / uniform, max(got) / uniform)


@pytest.mark.parametrize(("clips", "max_length"), [(21, TINY), (150, RECIPE)])
def test_reference_sampling_keeps_the_recipe_rule_and_its_defect(tmp_path, tokenizer, clips, max_length):
    """--sampling reference: a speaker shorter than the window always starts at sentence 0."""
    groups = number_items(load_groups(write_speaker(tmp_path, clips)))
    builder = SampleBuilder(tokenizer, groups, SamplingConfig(max_length=max_length, mode="reference"))
    rng = random.Random(0)
    window = max_length // 20
    for _ in range(20):
        group, items = builder.choose_items(rng)
        if window >= clips:
            assert [i.index for i in items] == list(range(clips))  # all of them, from the start
        else:
            first = items[0].index
            assert [i.index for i in items] == list(range(first, first + window))  # no wrap-around
    got = counts(tokenizer, groups, max_length, "reference", SAMPLES[max_length] // 2)
    assert got[0] > 0 and 0 in got  # the defect: most later sentences are never trained on


def test_cover_windows_are_consecutive_wrap_around_and_deal_every_start(tmp_path, tokenizer):
    groups = number_items(load_groups(write_speaker(tmp_path, 21)))
    builder = SampleBuilder(tokenizer, groups, SamplingConfig(max_length=100))  # window 5
    rng = random.Random(3)
    starts = []
    for _ in range(42):  # two passes over the 21 start offsets
        _, items = builder.choose_items(rng)
        index = [i.index for i in items]
        assert index == [(index[0] + k) % 21 for k in range(5)]
        starts.append(index[0])
    assert sorted(starts[:21]) == sorted(starts[21:]) == list(range(21))  # each start once per pass
    assert starts[:21] != list(range(21))  # in a shuffled order


def test_cover_sampling_is_deterministic_for_a_seed(tmp_path, tokenizer):
    groups = number_items(load_groups(write_speaker(tmp_path, 30)))
    a = counts(tokenizer, groups, TINY, "cover", 50, seed=7)
    assert a == counts(tokenizer, groups, TINY, "cover", 50, seed=7)
    assert a != counts(tokenizer, groups, TINY, "cover", 50, seed=8)


@pytest.mark.parametrize(("mode", "trained"), [("cover", True), ("reference", False)])
def test_a_clip_added_to_a_speaker_is_trained_on_in_the_next_run(tmp_path, tokenizer, mode, trained):
    """Rerun after new data landed: the new clip (packed last) shows up in the next run's samples."""
    before = write_speaker(tmp_path / "before", 20)
    after = write_speaker(tmp_path / "after", 21)  # same seed: the first 20 clips are the same
    old, new = load_groups(before)[0].items, load_groups(after)[0].items
    assert all(a.texts == b.texts for a, b in zip(old, new))
    dataset = TextSemanticDataset(after, tokenizer, SamplingConfig(max_length=TINY, mode=mode), seed=42)
    collate = Collator.from_tokenizer(tokenizer, TINY)
    stream = iter(dataset)
    seen = set()
    for _ in range(30):
        seen.update(collate([next(stream)])["sentences"].tolist())
    assert (20 in seen) == trained
    assert mode == "reference" or seen == set(range(21))


def test_unknown_sampling_mode_is_refused():
    with pytest.raises(ValueError, match="sampling must be one of"):
        SamplingConfig(mode="random")
