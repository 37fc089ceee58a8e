"""Transcript cleaning: the packer's tag stripping and the ``clean_text`` used by training/generation.

Both reproduce Fish Speech 1.4 exactly (fixtures README sections 4 and 6, ``clean-text.json``).
"""

from __future__ import annotations

import re
import unicodedata

# Packing (README section 6): applied in this order; both tag patterns are non-greedy.
_CURLY_TAG = re.compile(r"\{.*?\}")
_ANGLE_TAG = re.compile(r"<.*?>")
_WHITESPACE_RUN = re.compile(r"\s+")

# clean_text: CJK/typographic punctuation to ASCII, decorations dropped. Deliberately absent
# (the reference keeps them): "，", "！", "。" and ASCII quotes.
SYMBOL_MAP = {
    "“": "'", "”": "'", "‘": "'", "’": "'",
    "「": "'", "」": "'", "《": "'", "》": "'",
    "【": "", "】": "", "[": "", "]": "",
    "（": "", "）": "", "(": "", ")": "",
    "：": ",", "；": ",", ":": ",", ";": ",",
    "…": "...",
    "—": "", "~": "", "～": "", "·": "", "・": "",
    "\n": "",  # a newline joins the lines without a space (clean-text.json case 5)
}
_SYMBOLS = re.compile("|".join(map(re.escape, SYMBOL_MAP)))
# Emoticons, misc symbols & pictographs, transport & map, regional indicators (flag pairs).
# U+2764 (❤) and the U+FE0F variation selector are outside these ranges and survive.
_EMOJI = re.compile("[\U0001F600-\U0001F64F\U0001F300-\U0001F5FF\U0001F680-\U0001F6FF\U0001F1E0-\U0001F1FF]+")
# "...", ",,,", ".,.," and "!.." style runs keep only their first character.
_PUNCT_RUN = re.compile(r"[.,]{2,}")


def clean_pack_transcript(text: str) -> str:
    """The packer's cleaning: ``{...}`` and ``<...>`` become a space, whitespace runs one space.

    Nothing is stripped: a trailing newline becomes a trailing space, as in the reference.
    """
    text = _CURLY_TAG.sub(" ", text)
    text = _ANGLE_TAG.sub(" ", text)
    return _WHITESPACE_RUN.sub(" ", text)


def clean_text(text: str) -> str:
    """Fish Speech's ``clean_text``: strip, map punctuation, drop emoji, collapse ``.``/``,`` runs."""
    text = text.strip()
    text = _SYMBOLS.sub(lambda m: SYMBOL_MAP[m.group()], text)
    text = _EMOJI.sub("", text)
    return _PUNCT_RUN.sub(lambda m: m.group()[0], text)


def training_text(transcript: str) -> str:
    """What the model is trained on for a transcript file: pack cleaning, then ``clean_text``."""
    return clean_text(clean_pack_transcript(transcript))


def has_spoken_content(transcript: str) -> bool:
    """True if the training text holds at least one letter or digit (any script).

    Only punctuation, whitespace, zero-width/format characters (U+200B, U+200D, U+FEFF, ...),
    emoji or ``{...}``/``<...>`` tags leave nothing to say: such a transcript cannot label speech.
    """
    return any(unicodedata.category(ch)[0] in "LN" for ch in training_text(transcript))
