"""Transcript cleaning: the packer's tag stripping and the ``clean_text`` used by training/generation.

Both reproduce Fish Speech 1.4 exactly (fixtures README sections 4 and 6, ``clean-text.json``).
Before either, :func:`clean_transcript` removes what no transcript means to say (a BOM, NUL,
terminal escapes, other control characters) and composes Unicode to NFC: validate, normalize's
transcript copy and pack all read transcripts through it, so they agree on the text.
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


# ANSI/VT100 escape sequences (CSI "ESC [ ... final", OSC "ESC ] ... BEL|ESC \\", and two-byte
# "ESC x"): dropped whole, so no "[31m" residue reaches the training text.
_ESCAPE_SEQUENCE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?|\x9b[0-?]*[ -/]*[@-~]"
)
_BOM = "\ufeff"


def _clean_control(ch: str) -> str:
    # Whitespace controls (\t \n \r \v \f, \x1c-\x1f) stay: the packer's whitespace rule turns each run
    # into one space, exactly as in the reference. Other C0/C1 controls (NUL, BEL, DEL...) are noise.
    return ch if ch.isspace() else ""


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean_transcript(text: str) -> str:
    """The transcript as fishtune reads it: NFC, no BOM, no escape sequences or control characters.

    Idempotent, and the identity for ordinary text (the reference fixtures pass unchanged), so
    packing a cleaned transcript gives the reference's bytes. Whitespace is left to the packer.
    """
    text = text.replace(_BOM, "")
    text = _ESCAPE_SEQUENCE.sub("", text)
    text = _CONTROL.sub(lambda m: _clean_control(m.group()), text)
    return unicodedata.normalize("NFC", text)


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
