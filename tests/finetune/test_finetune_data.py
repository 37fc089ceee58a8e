import random
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fish_speech_core.finetune.data import (
    Collator,
    HeldOutDataset,
    SampleBuilder,
    SamplingConfig,
    TextSemanticDataset,
    encode_sentences,
    item_fraction,
    load_groups,
    split_groups,
    truncated_normal,
)
from fish_speech_core.formats.prompt import IGNORE_INDEX
from fish_speech_core.formats.protos import ProtoStreamError, ShardWriter, make_text_data
from fish_speech_core.formats.text_data_pb2 import Semantics
from fish_speech_core.tokenizer import FishTokenizer


@pytest.fixture(scope="module")
def tokenizer(reference):
    return FishTokenizer.from_dir(reference / "tokenizer")


def _write_shards(folder, sizes, frames=3, seed=0):
    """Groups G0, G1... with sentences 'gG sN' whose codes encode (group, sentence) in row 0."""
    rng = np.random.default_rng(seed)
    with ShardWriter(folder, shard_size_mb=1e-3) as writer:
        for g, size in enumerate(sizes):
            sentences = []
            for s in range(size):
                codes = rng.integers(0, 1024, (8, frames))
                codes[0, 0] = g
                codes[0, 1] = s
                sentences.append((f"g{g} s{s}", codes.tolist()))
            writer.write(make_text_data(f"G{g}", sentences))
    return folder


def _sentence_ids(sample, tokenizer):
    """(group, sentence) of every sentence in a sample, read back from its first code frame."""
    tokens = sample["tokens"]
    semantic = (tokens[0] == tokenizer.semantic_id).nonzero().flatten().tolist()
    starts = [t for t in semantic if t - 1 not in semantic]
    ids = []
    for start in starts:  # one turn starts each run; non-interactive turns hold several sentences
        run_end = start
        while run_end + 1 in semantic:
            run_end += 1
        for first in range(start, run_end + 1, 3):  # every sentence has 3 frames here
            ids.append((int(tokens[1, first]) - 1, int(tokens[1, first + 1]) - 1))
    return ids


def test_encoding_matches_every_reference_case(reference, tokenizer):
    cases = torch.load(reference / "pack-sentences.pt", weights_only=True)
    assert len(cases) == 5
    for case in cases:
        for semantics in (case["semantics"], [[Semantics(values=row) for row in s] for s in case["semantics"]]):
            tokens, labels = encode_sentences(
                tokenizer, case["sentences"], semantics, case["speaker"], case["skip_text"]
            )
            assert tokens.dtype == labels.dtype == torch.int64
            assert torch.equal(tokens, case["tokens"]), case["name"]
            assert torch.equal(labels, case["labels"]), case["name"]


def test_collator_reproduces_the_fixture_batch(reference, tokenizer):
    forward = torch.load(reference / "tiny-llama-forward.pt", weights_only=True)
    examples = []
    for e in forward["examples"]:
        tokens, labels = encode_sentences(tokenizer, e["sentences"], e["semantics"], e["speaker"], e["skip_text"])
        examples.append({"tokens": tokens, "labels": labels})
    batch = Collator.from_tokenizer(tokenizer, forward["collator_max_length"])(examples)
    for key in ("inputs", "attention_masks", "labels"):
        assert batch[key].dtype == forward[key].dtype
        assert torch.equal(batch[key], forward[key]), key
    assert batch["num_truncated"] == 0


def test_collator_never_exceeds_max_length_and_counts_cuts(reference, tokenizer):
    forward = torch.load(reference / "tiny-llama-forward.pt", weights_only=True)
    examples = [{"tokens": forward["inputs"][i, :, :n], "labels": forward["labels"][i, :, :n]}
                for i, n in enumerate((37, 70))]
    batch = Collator(text_pad_id=tokenizer.eos_id, max_length=50)(examples)
    assert batch["inputs"].shape == (2, 9, 50) and batch["num_truncated"] == 1
    assert torch.equal(batch["inputs"][1], forward["inputs"][1, :, :50])
    assert not batch["attention_masks"][1].any()
    assert torch.equal(batch["attention_masks"][0], forward["attention_masks"][0, :50])


def test_sampling_is_reproducible_and_seeded_explicitly(tmp_path, tokenizer):
    shards = _write_shards(tmp_path, [12, 5, 30])
    groups = load_groups(shards)

    def draw(seed):  # a builder per stream: in cover mode it keeps each speaker's deck of starts
        builder = SampleBuilder(tokenizer, groups, SamplingConfig(max_length=200))
        rng = random.Random(seed)
        return [builder.sample(rng) for _ in range(20)]

    a, b, c = draw(1), draw(1), draw(2)
    assert all(torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))
    assert any(x["tokens"].shape != y["tokens"].shape or not torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))


@pytest.mark.parametrize("mode", ["cover", "reference"])
@pytest.mark.parametrize("interactive_prob", [0.0, 1.0])
def test_samples_hold_consecutive_sentences_of_one_group(tmp_path, tokenizer, interactive_prob, mode):
    sizes = [40, 25]
    shards = _write_shards(tmp_path, sizes)
    config = SamplingConfig(max_length=100, interactive_prob=interactive_prob, mode=mode)  # budget 100 // 20 = 5
    builder = SampleBuilder(tokenizer, load_groups(shards), config)
    rng = random.Random(0)
    for _ in range(30):
        sample = builder.sample(rng)
        ids = _sentence_ids(sample, tokenizer)
        assert 1 <= len(ids) <= 5
        assert len({g for g, _ in ids}) == 1
        n = sizes[ids[0][0]]  # cover wraps around the speaker's end; reference never does
        expected = [(ids[0][1] + k) % n if mode == "cover" else ids[0][1] + k for k in range(len(ids))]
        assert [s for _, s in ids] == expected
        turns = int((sample["tokens"][0] == tokenizer.im_start_id).sum()) // 2
        assert turns == (len(ids) if interactive_prob == 1.0 else 1)
        text = tokenizer.decode(sample["tokens"][0].tolist())
        assert all(f"g{g} s{s}" in text for g, s in ids) and "<|im_start|>assistant\n" in text
        # next-token shift inside each turn: a turn ends predicting <|im_end|> where the next
        # turn's <|im_start|> follows (each turn dropped its own last column)
        labels, following = sample["labels"][0, :-1], sample["tokens"][0, 1:]
        differ = labels != following
        assert int(differ.sum()) == turns - 1
        assert (labels[differ] == tokenizer.im_end_id).all() and (following[differ] == tokenizer.im_start_id).all()


def test_groups_are_drawn_in_proportion_to_sentence_count(tmp_path, tokenizer):
    builder = SampleBuilder(tokenizer, load_groups(_write_shards(tmp_path, [10, 90])), SamplingConfig())
    rng = random.Random(0)
    counts = Counter(builder.choose_items(rng)[0].name for _ in range(4000))
    assert abs(counts["G0"] / 4000 - 0.1) < 0.02


def test_speaker_name_is_optional(tmp_path, tokenizer):
    groups = load_groups(_write_shards(tmp_path, [3]))
    for use_speaker, role in ((False, "assistant"), (True, "G0")):
        builder = SampleBuilder(tokenizer, groups, SamplingConfig(use_speaker=use_speaker))
        text = tokenizer.decode(builder.sample(random.Random(0))["tokens"][0].tolist())
        assert f"<|im_start|>{role}\n" in text


def test_truncated_normal_stays_in_range():
    rng = random.Random(0)
    draws = [truncated_normal(rng, 512, 256, 10, 1024) for _ in range(5000)]
    assert min(draws) >= 10 and max(draws) <= 1024
    assert abs(np.mean(draws) - 512) < 15  # symmetric truncation keeps the mean


def test_validation_split_is_by_item_content(tmp_path):
    groups = load_groups(_write_shards(tmp_path, [200, 100]))
    train, val = split_groups(groups, 0.2, "train"), split_groups(groups, 0.2, "val")
    key = lambda gs: {(g.name, i.texts) for g in gs for i in g.items}
    assert key(train).isdisjoint(key(val)) and key(train) | key(val) == key(groups)
    assert 0.12 < len(key(val)) / 300 < 0.28
    assert key(split_groups(groups, 0.2, "val")) == key(val)  # deterministic
    # the same sentence (content) always lands in the same split, wherever it appears
    item = groups[0].items[0]
    assert item_fraction(item) == item_fraction(type(item)(tuple(item.texts), item.codes.copy()))
    assert split_groups(groups, 0.0, "val") == []


def test_held_out_dataset_is_fixed_and_finite(tmp_path, tokenizer):
    shards = _write_shards(tmp_path, [60])
    held_out = HeldOutDataset(shards, tokenizer, val_fraction=0.25)
    val_items = split_groups(load_groups(shards), 0.25, "val")[0].items
    assert len(held_out) == len(val_items) > 0
    sample = held_out[0]
    expected = encode_sentences(tokenizer, [val_items[0].texts[0]], [val_items[0].codes])
    assert torch.equal(sample["tokens"], expected[0]) and torch.equal(sample["labels"], expected[1])


def _stream(shards, tokenizer, batches, rank=0, world_size=1, batch_size=4, workers=0, start_batch=0):
    """Micro-batches of one rank as its DataLoader yields them (lists of samples)."""
    dataset = TextSemanticDataset(shards, tokenizer, SamplingConfig(max_length=60), seed=3, rank=rank,
                                  world_size=world_size, batch_size=batch_size, start_batch=start_batch)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=list)
    return [batch for _, batch in zip(range(batches), loader)]


def test_global_batches_are_the_same_for_any_world_size_and_worker_count(tmp_path, tokenizer):
    """Rank r's slice of every micro-batch, whichever the number of ranks and DataLoader workers,
    is the r-th slice of the one-process batch: the run's samples do not depend on its layout."""
    shards = _write_shards(tmp_path, [7, 3, 9, 1])
    whole = _stream(shards, tokenizer, 5)  # global batch 4 in one process
    split = [_stream(shards, tokenizer, 5, rank=r, world_size=2, batch_size=2, workers=2) for r in range(2)]
    for m, batch in enumerate(whole):
        joined = split[0][m] + split[1][m]
        assert [int(s["uid"]) for s in batch] == [int(s["uid"]) for s in joined] == list(range(4 * m, 4 * m + 4))
        for a, b in zip(batch, joined, strict=True):
            assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])
    # a resumed rank starts at its slice of micro-batch start_batch
    resumed = _stream(shards, tokenizer, 2, rank=1, world_size=2, batch_size=2, start_batch=3)
    assert [int(s["uid"]) for s in resumed[0]] == [14, 15]
    assert torch.equal(resumed[0][0]["tokens"], whole[3][2]["tokens"])


def test_seed_and_epoch_change_the_stream(tmp_path, tokenizer):
    shards = _write_shards(tmp_path, [10, 10])
    first = [next(iter(TextSemanticDataset(shards, tokenizer, seed=1)))["tokens"] for _ in range(2)]
    assert torch.equal(*first)  # deterministic
    other = TextSemanticDataset(shards, tokenizer, seed=2)
    epoch = TextSemanticDataset(shards, tokenizer, seed=1)
    epoch.set_epoch(1)
    samples = [list(zip(range(6), iter(d))) for d in (TextSemanticDataset(shards, tokenizer, seed=1), other, epoch)]
    tokens = [[s["tokens"].tolist() for _, s in run] for run in samples]
    assert tokens[0] != tokens[1] and tokens[0] != tokens[2]


def test_bad_shards_fail_clearly(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="no \\*.proto"):
        TextSemanticDataset(tmp_path, tokenizer)
    (tmp_path / "00000000.protos").write_bytes(b"\x10\x00\x00\x00abc")
    with pytest.raises(ProtoStreamError, match="claims 16 bytes"):
        TextSemanticDataset(tmp_path, tokenizer)
    with pytest.raises(ValueError, match="max_length must be >= 20"):
        SamplingConfig(max_length=10)


def test_labels_ignore_padding_and_prompt_codebooks(tmp_path, tokenizer):
    builder = SampleBuilder(tokenizer, load_groups(_write_shards(tmp_path, [8])), SamplingConfig(max_length=120))
    rng = random.Random(5)
    batch = Collator.from_tokenizer(tokenizer, 120)([builder.sample(rng) for _ in range(4)])
    pad = batch["attention_masks"]
    assert (batch["labels"][:, :, :][pad.unsqueeze(1).expand_as(batch["labels"])] == IGNORE_INDEX).all()
    assert (batch["inputs"][:, 0][pad] == tokenizer.eos_id).all() and (batch["inputs"][:, 1:][pad.unsqueeze(1).expand(-1, 8, -1)] == 0).all()
