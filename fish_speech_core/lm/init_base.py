"""Randomly initialised base checkpoints, for offline demos, tests and benchmarks.

:func:`build_tokenizer` trains a small byte-level BPE tokenizer (the fixture tokenizer's recipe,
README section 1) on a built-in English + Spanish corpus, so no binary asset is shipped or
downloaded. :func:`init_base` writes a checkpoint folder that :func:`load_pretrained` reads.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from fish_speech_core.lm.checkpoint import save_pretrained
from fish_speech_core.lm.config import DualARConfig, find_multiple
from fish_speech_core.lm.model import DualARTransformer, init_weights
from fish_speech_core.meta import on_meta, to_empty
from fish_speech_core.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    IM_END_TOKEN,
    IM_START_TOKEN,
    MEL_TOKEN,
    PAD_TOKEN,
    PHONEME_END_TOKEN,
    PHONEME_START_TOKEN,
    SEMANTIC_TOKEN,
    SKIP_TEXT_TOKEN,
    FishTokenizer,
)

# Ids 0..9, in the order of the reference tokenizer (fixtures README section 1).
SPECIAL_TOKENS = (
    BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN, SEMANTIC_TOKEN, MEL_TOKEN,
    PHONEME_START_TOKEN, PHONEME_END_TOKEN, SKIP_TEXT_TOKEN,
)
TOKENIZER_VOCAB_SIZE = 900
CORPUS_SEED = 0
CORPUS_LINES = 480

_EN_SUBJECTS = (
    "The weather", "My friend", "This little house", "The old teacher", "Our neighbour",
    "The quick brown fox", "A quiet morning", "The train to the city", "Her voice",
    "The children", "Every evening", "The music", "His garden", "The river", "That story",
)
_EN_PREDICATES = (
    "is lovely today", "was very kind to us", "sounds wonderful", "looks brighter than before",
    "will arrive at seven", "sings in the kitchen", "needs a little more time",
    "reminds me of summer", "jumps over the lazy dog", "made everyone laugh",
    "is waiting by the station", "feels calm and warm", "has changed a lot this year",
)
_EN_TAILS = (
    ".", "!", "?", ", thank you very much!", ", I think.", " again.", ", of course.",
    " after the rain.", ", doesn't it?", " in the afternoon.",
)
_ES_SUBJECTS = (
    "El tiempo", "Mi amiga", "La casa pequeña", "El profesor", "Nuestra vecina",
    "La mañana tranquila", "El tren a la ciudad", "Su voz", "Los niños", "Cada noche",
    "La música", "Su jardín", "El río", "Esa canción", "La señora García",
)
_ES_PREDICATES = (
    "está muy bonito hoy", "fue muy amable con nosotros", "suena maravillosa",
    "parece más alegre que antes", "llegará a las siete", "canta en la cocina",
    "necesita un poco más de tiempo", "me recuerda el verano", "hizo reír a todos",
    "espera en la estación", "se siente tranquila", "ha cambiado mucho este año",
)
_ES_TAILS = (
    ".", "!", ", ¿verdad?", ", muchas gracias.", ", creo yo.", " otra vez.", ", por supuesto.",
    " después de la lluvia.", " por la tarde.",
)
_GREETINGS = (
    "Hello, how are you?", "Hola, ¿cómo estás?", "I am fine, thank you very much!",
    "Buenos días, señor.", "Good night and see you tomorrow.", "¡Qué día tan bonito!",
    "Where is the library?", "¿Dónde está la biblioteca?", "One, two, three, four, five.",
    "Uno, dos, tres, cuatro, cinco.",
)


def demo_corpus(lines: int = CORPUS_LINES, seed: int = CORPUS_SEED) -> list[str]:
    """Deterministic English and Spanish sentences built from templates."""
    rng = random.Random(seed)
    corpus = list(_GREETINGS)
    while len(corpus) < lines:
        if rng.random() < 0.5:
            parts = (_EN_SUBJECTS, _EN_PREDICATES, _EN_TAILS)
        else:
            parts = (_ES_SUBJECTS, _ES_PREDICATES, _ES_TAILS)
        subject, predicate, tail = (rng.choice(p) for p in parts)
        corpus.append(f"{subject} {predicate}{tail}")
    return corpus


def build_tokenizer(vocab_size: int = TOKENIZER_VOCAB_SIZE) -> FishTokenizer:
    """A byte-level BPE tokenizer with the 10 special tokens at ids 0..9 (same input -> same file)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(demo_corpus(), trainer)
    return FishTokenizer(tokenizer)


def base_config(preset: DualARConfig, tokenizer: FishTokenizer) -> DualARConfig:
    """The preset, with vocab_size grown to the tokenizer's length rounded up to 8 if needed."""
    vocab_size = max(preset.vocab_size, find_multiple(len(tokenizer), 8))
    return DualARConfig.from_dict({**preset.to_dict(), "vocab_size": vocab_size})


def init_base(
    out: str | os.PathLike,
    preset: DualARConfig,
    seed: int = 0,
    tokenizer: FishTokenizer | None = None,
) -> DualARTransformer:
    """Write a randomly initialised checkpoint folder (config.json, model.pth, tokenizer).

    Args:
        out: the folder to write.
        preset: the model shape, e.g. ``PRESETS["tiny"]``.
        seed: seeds the weights (a private ``torch.Generator``); same seed -> same weights.
        tokenizer: defaults to :func:`build_tokenizer`.
    """
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    config = base_config(preset, tokenizer)
    generator = torch.Generator().manual_seed(seed)
    # Meta first: the default nn init would draw from the global RNG and waste time.
    with on_meta():
        model = DualARTransformer(config, tokenizer.semantic_id)
    to_empty(model, "cpu")
    model.reset_buffers("cpu")
    init_weights(model, generator)
    save_pretrained(model, Path(out), tokenizer)
    return model
