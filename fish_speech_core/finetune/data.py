"""Training samples from ``.protos`` shards: encoding, sampling, datasets, collator, val split.

Same semantics as Fish Speech 1.4's ``AutoTextSemanticInstructionDataset`` + ``TextDataCollator``
(fixtures README sections 3 and 4), with every random draw taken from explicit generators
instead of the global RNGs, and one deliberate change of the default: which sentences a sample
starts from (``SAMPLING_MODES``).

The training stream is one numbered sequence of samples per (seed, epoch), the same in every
process: sample ``i`` draws its speaker from a chunk of picks seeded by (seed, epoch, i // CHUNK)
and everything else from a ``random.Random`` of its own, seeded by (seed, epoch, i). Micro-batch
``m`` is samples ``[m·G, (m+1)·G)`` of it (G the global batch) and rank ``r`` takes the r-th
slice, so the global batch, and so the training, does not depend on how many processes share it.
"""

from __future__ import annotations

import hashlib
import itertools
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

    In ``cover`` mode a speaker's windows start at offsets dealt from decks of every offset. With
    ``deck_seed`` None (the sequential form, :meth:`sample`) a deck is shuffled by the sample's
    ``rng`` when the previous one is used up, so the stream is stateful. With a ``deck_seed``
    (the training stream, :class:`SampleStream`), pass ``p`` of group ``g`` is ``range(n)``
    shuffled by a generator seeded from (deck_seed, g, p): the k-th window of a speaker is a
    function of k alone, and any process can deal it.
    """

    def __init__(self, tokenizer: FishTokenizer, groups: Sequence[Group], config: SamplingConfig,
                 deck_seed: int | str | None = None) -> None:
        self.tokenizer = tokenizer
        self.groups = [g for g in groups if g.items]
        if not self.groups:
            raise ValueError("no sentences to sample from")
        self.weights = [len(g.items) for g in self.groups]  # groups drawn by sentence count
        self.cum_weights = list(itertools.accumulate(self.weights))
        self.config = config
        self.deck_seed = deck_seed
        self.dealt = [0] * len(self.groups)  # windows dealt per group by sample()/choose_items()
        self.decks: dict[int, list[int]] = {}  # sequential form: group -> start offsets not yet dealt
        self._decks: dict[int, tuple[int, list[int]]] = {}  # seeded form: group -> (pass, its deck), the latest

    def pick_group(self, rng: random.Random) -> int:
        # cum_weights: the same draw as weights=, without summing them again for every sample
        return rng.choices(range(len(self.groups)), cum_weights=self.cum_weights, k=1)[0]

    def deck(self, index: int, rank: int) -> int:
        """The start offset of group ``index``'s window number ``rank`` (0, 1, ...), seeded form."""
        n = len(self.groups[index].items)
        passed, position = divmod(rank, n)
        cached = self._decks.get(index)
        if cached is None or cached[0] != passed:
            deck = list(range(n))
            random.Random(f"{self.deck_seed}:deck:{index}:{passed}").shuffle(deck)
            cached = self._decks[index] = (passed, deck)
        return cached[1][position]

    def window(self, index: int, rng: random.Random, dealt: int) -> list[Item]:
        """The sentences of group ``index``'s window; ``dealt``: its windows dealt before this one."""
        group = self.groups[index]
        budget = self.config.max_length // TOKENS_PER_SENTENCE_ESTIMATE
        if not self.config.causal:
            return rng.choices(group.items, k=min(budget, len(group.items)))
        n = len(group.items)
        if self.config.mode == "reference":
            if budget >= n:
                return list(group.items)
            begin = rng.randint(0, n - budget)
            return list(group.items[begin : begin + budget])
        # cover: every offset once per deck (then a new shuffle), window wrapping past the end,
        # so each sentence leads, and is inside, the same number of windows per pass.
        if self.deck_seed is not None:
            begin = self.deck(index, dealt)
        else:
            deck = self.decks.get(index)
            if not deck:
                deck = list(range(n))
                rng.shuffle(deck)
                self.decks[index] = deck
            begin = deck.pop()
        return [group.items[(begin + i) % n] for i in range(min(budget, n))]

    def choose_items(self, rng: random.Random) -> tuple[Group, list[Item]]:
        index = self.pick_group(rng)
        dealt = self.dealt[index]
        self.dealt[index] += 1
        return self.groups[index], self.window(index, rng, dealt)

    def sample(self, rng: random.Random) -> Sample:
        """One sample. Interactive: a turn per sentence until ``max_length`` tokens are spent.
        Otherwise one long turn whose token budget is a truncated normal draw.

        The sentence that crosses the budget is still included; the collator truncates.
        """
        return self.build(*self.choose_items(rng), rng)

    def build(self, group: Group, items: list[Item], rng: random.Random) -> Sample:
        """The sample of a chosen window: turns, texts and the rest of the draws from ``rng``."""
        cfg = self.config
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


# --- datasets --------------------------------------------------------------------------------


CHUNK = 4096  # speaker picks drawn per generator call (vectorised: replaying a long run is cheap)


class SampleStream:
    """The run's numbered samples, built on demand in increasing order (any subset of them).

    Every process holds one and builds only its own samples; the speaker picks of all the others
    are replayed (numpy, a chunk at a time) because a cover-mode window depends on how often its
    speaker was picked before.
    """

    def __init__(self, builder: SampleBuilder, seed: int, epoch: int = 0) -> None:
        self.builder = builder
        self.seed = seed
        self.epoch = epoch
        self.cum = np.asarray(builder.cum_weights, dtype=np.float64)
        self.counts = np.zeros(len(builder.groups), dtype=np.int64)  # picks of samples < position
        self.position = 0
        self._chunk: tuple[int, np.ndarray] | None = None

    def picks(self, chunk: int) -> np.ndarray:
        """Group index of samples ``[chunk·CHUNK, (chunk+1)·CHUNK)``, drawn by sentence count."""
        if self._chunk is None or self._chunk[0] != chunk:
            entropy = np.random.SeedSequence([self.seed % 2**64, self.epoch, chunk])
            u = np.random.Generator(np.random.PCG64(entropy)).random(CHUNK) * self.cum[-1]
            self._chunk = (chunk, np.searchsorted(self.cum, u, side="right"))
        return self._chunk[1]

    def _advance(self, index: int) -> None:
        while self.position < index:
            chunk, offset = divmod(self.position, CHUNK)
            stop = min(CHUNK, offset + index - self.position)
            self.counts += np.bincount(self.picks(chunk)[offset:stop], minlength=len(self.counts))
            self.position += stop - offset

    def sample(self, index: int) -> Sample:
        """Sample number ``index`` (>= every index asked for before), with its ``uid``: ``index``."""
        if index < self.position:
            raise ValueError(f"sample {index} comes before {self.position}: a stream only moves forward")
        self._advance(index)
        group = int(self.picks(index // CHUNK)[index % CHUNK])
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        items = self.builder.window(group, rng, dealt=int(self.counts[group]))
        out = self.builder.build(self.builder.groups[group], items, rng)
        out["uid"] = torch.tensor(index)
        return out


class TextSemanticDataset(IterableDataset):
    """Endless training samples from ``.protos`` shards: this rank's share of every global batch.

    Micro-batch ``m`` of the run is samples ``[m·G, (m+1)·G)`` of the :class:`SampleStream`
    (``G = batch_size · world_size``); rank ``r`` yields the ``batch_size`` samples
    ``m·G + r·batch_size ...`` of every micro-batch from ``start_batch`` on, and DataLoader
    worker ``w`` of ``W`` the micro-batches ``start_batch + w, + W, ...`` (the loader takes whole
    batches from its workers in turn). So the samples of a step depend on the seed, the epoch,
    the global batch and the step only: not on the world size, the worker count or a resume.
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
        batch_size: int = 1,
        start_batch: int = 0,
        val_fraction: float = 0.0,
        split: str = "train",
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if batch_size < 1 or start_batch < 0:
            raise ValueError(f"batch_size must be >= 1 and start_batch >= 0, got {batch_size} and {start_batch}")
        self.groups = number_items(split_groups(load_groups(paths), val_fraction, split))
        if not self.groups:
            raise ValueError(f"the {split} split is empty (val_fraction={val_fraction})")
        self.tokenizer = tokenizer
        self.config = config
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.start_batch = start_batch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def stream(self) -> SampleStream:
        """A fresh stream of every sample of this epoch (each process builds its own share)."""
        builder = SampleBuilder(self.tokenizer, self.groups, self.config, deck_seed=f"{self.seed}:{self.epoch}")
        return SampleStream(builder, self.seed, self.epoch)

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info else (0, 1)
        stream = self.stream()
        global_batch = self.batch_size * self.world_size
        batch = self.start_batch + worker_id
        while True:
            first = batch * global_batch + self.rank * self.batch_size
            for index in range(first, first + self.batch_size):
                yield stream.sample(index)
            batch += num_workers


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
    samples that carry none, e.g. validation), and ``uids`` (B,), each sample's number in the
    training stream (-1 for samples without one: it keys the sample's dropout masks).
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
            "uids": torch.tensor([int(e["uid"]) if "uid" in e else -1 for e in examples], dtype=torch.long),
        }
