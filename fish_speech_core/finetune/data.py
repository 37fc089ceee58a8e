"""Training samples from ``.protos`` shards: encoding, sampling, datasets, collator, val split.

Same semantics as Fish Speech 1.4's ``AutoTextSemanticInstructionDataset`` + ``TextDataCollator``
(fixtures README sections 3 and 4), with every random draw taken from an explicit
``random.Random`` seeded per (seed, epoch, rank, worker) instead of the global RNGs, and one
deliberate change of the default: which sentences a sample starts from (``SAMPLING_MODES``).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from statistics import NormalDist

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from fish_speech_core.choices import Sampling, values
from fish_speech_core.defaults import SEED
from fish_speech_core.formats.prompt import (
    CODEBOOK_OFFSET,
    CODEBOOK_PAD_ID,
    IGNORE_INDEX,
    TEXT_PAD_TOKEN,
    TOKENS_PER_SENTENCE_ESTIMATE,
    turn_prompt,
)
from fish_speech_core.formats.protos import iter_text_data
from fish_speech_core.formats.text import clean_text
from fish_speech_core.tokenizer import FishTokenizer

# {"tokens": (1+C, L) int64, "labels": (1+C, L) int64}; training samples also carry
# "sentences": (k, 2) int64, per sentence its Item.index and the column its codes start at.
Sample = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Item:
    """One utterance: its transcript(s) and raw codes, (num_codebooks, frames) int64.

    ``index`` numbers the training split's sentences (:func:`number_items`); -1 elsewhere.
    """

    texts: tuple[str, ...]
    codes: np.ndarray
    index: int = field(default=-1, compare=False)


@dataclass(frozen=True)
class Group:
    """One TextData record: a speaker and its utterances in packed (causal) order."""

    source: str
    name: str
    items: tuple[Item, ...]


# How a sample's window of consecutive sentences is placed in its speaker (docs/train.md, Sampling).
#   cover:     the window starts at an offset dealt from a per-speaker shuffled deck of every
#              offset and wraps around the speaker's end, so every sentence is equally likely.
#   reference: Fish Speech 1.4's rule: a random start when the speaker has more sentences than
#              the window, else all of them from sentence 0 (most clips are never trained on).
SAMPLING_MODES = values(Sampling)  # ("cover", "reference")
DEFAULT_SAMPLING = Sampling.cover.value


@dataclass(frozen=True)
class SamplingConfig:
    """How samples are drawn (defaults = the Fish Speech 1.4 finetune recipe)."""

    max_length: int = 1024
    interactive_prob: float = 0.7  # P(each sentence its own user/assistant turn)
    use_speaker: bool | float = False  # float = probability of naming the speaker
    causal: bool = True  # consecutive sentences (else drawn with replacement)
    skip_text_prob: float = 0.0  # per interactive turn: replace the text by <|skip_text|>
    num_codebooks: int | None = None  # None: as many as the data has
    mode: str = DEFAULT_SAMPLING  # one of SAMPLING_MODES

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in SAMPLING_MODES:
            problems.append(f"sampling must be one of {list(SAMPLING_MODES)}, got {self.mode!r}")
        if self.max_length < TOKENS_PER_SENTENCE_ESTIMATE:
            problems.append(f"max_length must be >= {TOKENS_PER_SENTENCE_ESTIMATE}, got {self.max_length}")
        for name in ("interactive_prob", "skip_text_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not isinstance(self.use_speaker, bool) and not 0.0 <= self.use_speaker <= 1.0:
            problems.append(f"use_speaker must be a bool or a probability, got {self.use_speaker}")
        if problems:
            raise ValueError("; ".join(problems))


# --- reading ---------------------------------------------------------------------------------


def codes_array(semantics) -> np.ndarray:
    """(num_codebooks, frames) int64 from Semantics messages, nested lists, arrays or tensors."""
    if isinstance(semantics, torch.Tensor):
        semantics = semantics.numpy()
    rows = [np.asarray(getattr(row, "values", row), dtype=np.int64) for row in semantics]
    lengths = {len(row) for row in rows}
    if len(lengths) > 1:
        raise ValueError(f"codebook rows have different lengths {sorted(lengths)}")
    return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.int64)


def load_groups(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Group]:
    """Every TextData in the shards (files or folders, sorted) as Groups.

    Raises:
        FileNotFoundError: no shards. ProtoStreamError: a damaged shard.
    """
    return [
        Group(
            source=record.source,
            name=record.name,
            items=tuple(Item(tuple(s.texts), codes_array(s.semantics)) for s in record.sentences),
        )
        for record in iter_text_data(paths)
    ]


# --- encoding --------------------------------------------------------------------------------


def encode_sentences(
    tokenizer: FishTokenizer,
    sentences: Sequence[str],
    semantics: Sequence,
    speaker: str | None = None,
    skip_text: bool = False,
    num_codebooks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One user/assistant turn as ``(tokens, labels)``, each (1 + C, L) int64.

    Row 0: the prompt ids, one ``<|semantic|>`` per frame, ``<|im_end|>``. Rows 1..C: 0 under
    the prompt, ``code + 1`` per frame (sentences concatenated), a trailing 0. Labels ignore
    the codebooks under the prompt and are shifted one step left of the tokens (tokens drop the
    last column, labels the first). With ``skip_text`` all labels are ignored and nothing is
    shifted. Sentences are used as given (callers clean them).
    """
    codes = [codes_array(s) for s in semantics]
    if len(codes) != len(sentences) or not codes:
        raise ValueError(f"need one codes array per sentence, got {len(sentences)} sentences and {len(codes)} codes")
    num_codebooks = num_codebooks or codes[0].shape[0]
    if any(c.shape[0] < num_codebooks for c in codes):
        raise ValueError(f"every sentence needs {num_codebooks} codebook rows, got {[c.shape[0] for c in codes]}")
    frames = np.concatenate([c[:num_codebooks] for c in codes], axis=1)  # (C, F)

    prompt = tokenizer.encode(turn_prompt(" ".join(sentences), speaker, skip_text))
    num_frames = frames.shape[1]
    length = len(prompt) + num_frames + 1
    tokens = torch.full((num_codebooks + 1, length), CODEBOOK_PAD_ID, dtype=torch.long)
    tokens[0, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    tokens[0, len(prompt) : -1] = tokenizer.semantic_id
    tokens[0, -1] = tokenizer.im_end_id
    tokens[1:, len(prompt) : -1] = torch.from_numpy(frames) + CODEBOOK_OFFSET

    if skip_text:
        return tokens, torch.full_like(tokens, IGNORE_INDEX)
    labels = tokens.clone()
    labels[1:, : len(prompt)] = IGNORE_INDEX
    return tokens[:, :-1], labels[:, 1:]


# --- sampling --------------------------------------------------------------------------------


def truncated_normal(rng: random.Random, mean: float, std: float, low: float, high: float) -> float:
    """A normal draw restricted to [low, high] by inverse-CDF sampling (as torch's trunc_normal_)."""
    dist = NormalDist(mean, std)
    u = rng.uniform(dist.cdf(low), dist.cdf(high))
    return min(max(dist.inv_cdf(min(max(u, 1e-12), 1 - 1e-12)), low), high)


class SampleBuilder:
    """Draws training samples from groups: a speaker, then consecutive sentences packed as turns.

    Stateful in ``cover`` mode (each speaker's deck of start offsets), so one builder per stream:
    the same rng draws in the same order give the same samples, which resume relies on.
    """

    def __init__(self, tokenizer: FishTokenizer, groups: Sequence[Group], config: SamplingConfig) -> None:
        self.tokenizer = tokenizer
        self.groups = [g for g in groups if g.items]
        if not self.groups:
            raise ValueError("no sentences to sample from")
        self.weights = [len(g.items) for g in self.groups]  # groups drawn by sentence count
        self.config = config
        self.decks: dict[int, list[int]] = {}  # group index -> start offsets not yet dealt

    def choose_items(self, rng: random.Random) -> tuple[Group, list[Item]]:
        index = rng.choices(range(len(self.groups)), weights=self.weights, k=1)[0]
        group = self.groups[index]
        budget = self.config.max_length // TOKENS_PER_SENTENCE_ESTIMATE
        if not self.config.causal:
            return group, rng.choices(group.items, k=min(budget, len(group.items)))
        n = len(group.items)
        if self.config.mode == "reference":
            if budget >= n:
                return group, list(group.items)
            begin = rng.randint(0, n - budget)
            return group, list(group.items[begin : begin + budget])
        # cover: every offset once per deck (then a new shuffle), window wrapping past the end,
        # so each sentence leads, and is inside, the same number of windows per pass.
        deck = self.decks.get(index)
        if not deck:
            deck = list(range(n))
            rng.shuffle(deck)
            self.decks[index] = deck
        begin = deck.pop()
        return group, [group.items[(begin + i) % n] for i in range(min(budget, n))]

    def sample(self, rng: random.Random) -> Sample:
        """One sample. Interactive: a turn per sentence until ``max_length`` tokens are spent.
        Otherwise one long turn whose token budget is a truncated normal draw.

        The sentence that crosses the budget is still included; the collator truncates.
        """
        cfg = self.config
        group, items = self.choose_items(rng)
        interactive = rng.random() < cfg.interactive_prob
        if interactive:
            remaining = cfg.max_length
        else:
            draw = truncated_normal(rng, cfg.max_length // 2, cfg.max_length // 4, 10, cfg.max_length)
            remaining = int(draw) - 4
        use_speaker = cfg.use_speaker if isinstance(cfg.use_speaker, bool) else rng.random() < cfg.use_speaker
        speaker = group.name if use_speaker else None

        turns: list[tuple[torch.Tensor, torch.Tensor]] = []
        texts: list[str] = []
        used: list[Item] = []
        starts: list[int] = []  # column of each sentence's first code frame in the sample
        column = 0
        while remaining > 0 and items:
            item = items.pop(0)
            used.append(item)
            text = clean_text(rng.choice(item.texts))
            remaining -= len(self.tokenizer.encode(text)) + item.codes.shape[1]
            if interactive:
                skip = rng.random() < cfg.skip_text_prob
                turn = encode_sentences(self.tokenizer, [text], [item.codes], speaker, skip, cfg.num_codebooks)
                turns.append(turn)
                # a turn is prompt + frames (+ the trailing column that skip_text keeps)
                starts.append(column + turn[0].shape[1] - item.codes.shape[1] - int(skip))
                column += turn[0].shape[1]
            else:
                texts.append(text)
        if not interactive:
            turn = encode_sentences(self.tokenizer, texts, [i.codes for i in used], speaker, False, cfg.num_codebooks)
            turns.append(turn)
            frame = turn[0].shape[1] - sum(i.codes.shape[1] for i in used)
            for i in used:
                starts.append(frame)
                frame += i.codes.shape[1]
        return {
            "tokens": torch.cat([t for t, _ in turns], dim=1),
            "labels": torch.cat([lab for _, lab in turns], dim=1),
            "sentences": torch.tensor([[i.index, start] for i, start in zip(used, starts)], dtype=torch.long),
        }


# --- splitting -------------------------------------------------------------------------------


def item_fraction(item: Item) -> float:
    """A stable number in [0, 1) from the item's content (texts and codes, not its position)."""
    digest = hashlib.sha256()
    digest.update("\x1f".join(item.texts).encode("utf-8"))
    digest.update(np.asarray(item.codes.shape, dtype="<i8").tobytes())
    digest.update(np.ascontiguousarray(item.codes, dtype="<i8").tobytes())
    return int.from_bytes(digest.digest()[:8], "big") / 2**64


def split_groups(groups: Sequence[Group], val_fraction: float, split: str) -> list[Group]:
    """Keep the ``"train"`` or ``"val"`` items; an item is val when ``item_fraction < val_fraction``.

    Identical sentences hash alike, so a sentence never lands in both splits.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    want_val = split == "val"
    kept = []
    for group in groups:
        items = tuple(i for i in group.items if (item_fraction(i) < val_fraction) == want_val)
        if items:
            kept.append(Group(group.source, group.name, items))
    return kept


def number_items(groups: Sequence[Group]) -> list[Group]:
    """The groups with their items numbered 0, 1, ... in order (``Item.index``), so a sample can
    name its sentences across DataLoader processes (coverage: :func:`coverage`)."""
    numbered, next_index = [], 0
    for g in groups:
        items = tuple(replace(item, index=next_index + i) for i, item in enumerate(g.items))
        next_index += len(items)
        numbered.append(Group(g.source, g.name, items))
    return numbered


def coverage(groups: Sequence[Group], seen: Iterable[int]) -> dict[str, dict[str, int]]:
    """Per speaker (group name): ``{"seen": sentences trained on, "sentences": in the split}``
    from numbered ``groups`` and the ``Item.index`` values that were trained on."""
    seen = set(seen)
    out: dict[str, dict[str, int]] = {}
    for g in groups:
        row = out.setdefault(g.name, {"seen": 0, "sentences": 0})
        row["sentences"] += len(g.items)
        row["seen"] += sum(item.index in seen for item in g.items)
    return out


def partition_groups(groups: Sequence[Group], part: int, num_parts: int) -> list[Group]:
    """The share of ``part`` out of ``num_parts`` (ranks x DataLoader workers), disjoint.

    With at least as many groups as parts, whole groups are dealt round-robin (keeps each
    speaker's sentences together); otherwise each group is cut into ``num_parts`` contiguous
    slices and part i gets slice i of every group.
    """
    if not 0 <= part < num_parts:
        raise ValueError(f"part {part} out of range for {num_parts} parts")
    if len(groups) >= num_parts:
        return list(groups[part::num_parts])
    share = []
    for g in groups:
        n = len(g.items)
        items = g.items[part * n // num_parts : (part + 1) * n // num_parts]
        if items:
            share.append(Group(g.source, g.name, items))
    return share


# --- datasets --------------------------------------------------------------------------------


class TextSemanticDataset(IterableDataset):
    """Endless training samples from ``.protos`` shards, split across DDP ranks and workers.

    Each (rank, worker) samples only its own disjoint share of the data, with a
    ``random.Random`` seeded from (seed, epoch, rank, worker). Call :meth:`set_epoch` to vary
    the stream between epochs.
    """

    def __init__(
        self,
        paths: str | os.PathLike | Iterable[str | os.PathLike],
        tokenizer: FishTokenizer,
        config: SamplingConfig = SamplingConfig(),
        *,
        seed: int = SEED,
        rank: int = 0,
        world_size: int = 1,
        val_fraction: float = 0.0,
        split: str = "train",
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.groups = number_items(split_groups(load_groups(paths), val_fraction, split))
        if not self.groups:
            raise ValueError(f"the {split} split is empty (val_fraction={val_fraction})")
        self.tokenizer = tokenizer
        self.config = config
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self, worker_id: int = 0, num_workers: int = 1) -> list[Group]:
        """The groups this rank's ``worker_id`` samples from."""
        part = self.rank * num_workers + worker_id
        share = partition_groups(self.groups, part, self.world_size * num_workers)
        if not share:
            raise ValueError(
                f"rank {self.rank} worker {worker_id} got no sentences: the data has fewer sentences "
                f"than ranks x workers ({self.world_size * num_workers}); use fewer DataLoader workers"
            )
        return share

    def rng(self, worker_id: int = 0) -> random.Random:
        entropy = np.random.SeedSequence([self.seed, self.epoch, self.rank, worker_id])
        return random.Random(int(entropy.generate_state(1, dtype=np.uint64)[0]))

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info else (0, 1)
        builder = SampleBuilder(self.tokenizer, self.shard(worker_id, num_workers), self.config)
        rng = self.rng(worker_id)
        while True:
            yield builder.sample(rng)


class HeldOutDataset(Dataset):
    """The validation split as a fixed list: every held-out sentence as one user/assistant turn.

    Deterministic and finite, so a validation loss is comparable between runs; use a
    ``DistributedSampler`` to split it across ranks.
    """

    def __init__(
        self,
        paths: str | os.PathLike | Iterable[str | os.PathLike],
        tokenizer: FishTokenizer,
        val_fraction: float,
        num_codebooks: int | None = None,
    ) -> None:
        groups = split_groups(load_groups(paths), val_fraction, "val")
        self.items = [item for g in groups for item in g.items]
        self.tokenizer = tokenizer
        self.num_codebooks = num_codebooks

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        item = self.items[index]
        tokens, labels = encode_sentences(
            self.tokenizer, [clean_text(item.texts[0])], [item.codes], num_codebooks=self.num_codebooks
        )
        return {"tokens": tokens, "labels": labels}


# --- batching --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Collator:
    """Pad samples to the batch's longest (at most ``max_length``, longer ones are cut).

    Returns ``inputs`` and ``labels`` (B, 1+C, T), ``attention_masks`` (B, T) with True = padding,
    ``num_truncated``, how many samples were cut to ``max_length``, and ``sentences``, the
    ``Item.index`` of every sentence whose codes start inside the kept columns (empty for
    samples that carry none, e.g. validation).
    """

    text_pad_id: int
    max_length: int

    @classmethod
    def from_tokenizer(cls, tokenizer: FishTokenizer, max_length: int) -> "Collator":
        return cls(text_pad_id=tokenizer.token_id(TEXT_PAD_TOKEN), max_length=max_length)

    def __call__(self, examples: Sequence[Sample]) -> dict[str, torch.Tensor | int]:
        length = min(max(e["tokens"].shape[1] for e in examples), self.max_length)
        inputs, labels, masks = [], [], []
        truncated = 0
        sentences = []
        for example in examples:
            if "sentences" in example and len(example["sentences"]):
                kept = example["sentences"][example["sentences"][:, 1] < length]
                sentences.append(kept[:, 0])
            tokens = example["tokens"][:, :length]
            label = example["labels"][:, :length]
            truncated += example["tokens"].shape[1] > length
            n = tokens.shape[1]
            padded = torch.full((tokens.shape[0], length), CODEBOOK_PAD_ID, dtype=tokens.dtype)
            padded[0, n:] = self.text_pad_id
            padded[:, :n] = tokens
            padded_labels = torch.full((label.shape[0], length), IGNORE_INDEX, dtype=label.dtype)
            padded_labels[:, :n] = label
            mask = torch.ones(length, dtype=torch.bool)  # True = padding
            mask[:n] = False
            inputs.append(padded)
            labels.append(padded_labels)
            masks.append(mask)
        return {
            "inputs": torch.stack(inputs),
            "attention_masks": torch.stack(masks),
            "labels": torch.stack(labels),
            "num_truncated": truncated,
            "sentences": torch.cat(sentences) if sentences else torch.zeros(0, dtype=torch.long),
        }
