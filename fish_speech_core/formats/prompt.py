"""The dual-AR prompt format of Fish Speech 1.4: the one module that owns it.

A sample is a (1 + num_codebooks, T) int tensor. Row 0 holds text token ids; rows 1.. hold
``code + CODEBOOK_OFFSET`` under each ``<|semantic|>`` position and ``CODEBOOK_PAD_ID`` elsewhere.
Training data, the model and generation import these names instead of repeating the numbers.
(Values: fixtures README sections 3, 4 and "What encode_tokens does".)
"""

from __future__ import annotations

from fish_speech_core.tokenizer import (
    EOS_TOKEN,
    IM_END_TOKEN,
    IM_START_TOKEN,
    SEMANTIC_TOKEN,
    SKIP_TEXT_TOKEN,
)

USER_ROLE = "user"
ASSISTANT_ROLE = "assistant"

# One user turn, then the opening of the reply turn; the reply's codes follow as <|semantic|>
# columns and the turn closes with <|im_end|>. ``speaker`` replaces "assistant" when given.
TURN_TEMPLATE = IM_START_TOKEN + "{role}\n{text}" + IM_END_TOKEN + IM_START_TOKEN + "{speaker}\n"

CODEBOOK_OFFSET = 1  # codebook rows store code + 1 ...
CODEBOOK_PAD_ID = 0  # ... so 0 means "no code here" (under text, and as padding)
IGNORE_INDEX = -100  # labels that take no part in the loss
TEXT_PAD_TOKEN = EOS_TOKEN  # the collator pads the text row with the eos id (not <|pad|>)

# The collator's attention mask is a key-padding mask: True marks PADDING (not "attend here").
# The model passes it as ``key_padding_mask``.
ATTENTION_MASK_TRUE_IS_PADDING = True

# Sampling estimates every sentence at >= this many tokens: a sample holds at most
# max_length // TOKENS_PER_SENTENCE_ESTIMATE sentences.
TOKENS_PER_SENTENCE_ESTIMATE = 20


def turn_prompt(text: str, speaker: str | None = None, skip_text: bool = False) -> str:
    """``<|im_start|>user\\n{text}<|im_end|><|im_start|>{speaker or assistant}\\n``.

    With ``skip_text`` the text is replaced by ``<|skip_text|>``. No cleaning happens here.
    """
    return TURN_TEMPLATE.format(
        role=USER_ROLE,
        text=SKIP_TEXT_TOKEN if skip_text else text,
        speaker=speaker or ASSISTANT_ROLE,
    )


__all__ = [
    "ASSISTANT_ROLE",
    "ATTENTION_MASK_TRUE_IS_PADDING",
    "CODEBOOK_OFFSET",
    "CODEBOOK_PAD_ID",
    "IGNORE_INDEX",
    "IM_END_TOKEN",
    "IM_START_TOKEN",
    "SEMANTIC_TOKEN",
    "SKIP_TEXT_TOKEN",
    "TEXT_PAD_TOKEN",
    "TOKENS_PER_SENTENCE_ESTIMATE",
    "TURN_TEMPLATE",
    "USER_ROLE",
    "turn_prompt",
]

# Names this prompt format in adapter metadata: an adapter trained on another format is refused.
PROMPT_FORMAT_VERSION = "fish-speech-1.4"
