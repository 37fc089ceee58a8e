"""The text tokenizer of a Fish Speech 1.4 checkpoint, loaded with the ``tokenizers`` library.

A checkpoint folder holds ``tokenizer.json`` (the serialization) plus the transformers-style
``tokenizer_config.json`` and ``special_tokens_map.json``. We read only ``tokenizer.json`` to
encode, and copy all three on save so Fish Speech (which uses transformers) loads our folders.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from fish_speech_core.files import atomic_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SEMANTIC_TOKEN = "<|semantic|>"
MEL_TOKEN = "<|mel|>"
PHONEME_START_TOKEN = "<|phoneme_start|>"
PHONEME_END_TOKEN = "<|phoneme_end|>"
SKIP_TEXT_TOKEN = "<|skip_text|>"

# Every special token the 1.4 prompt format uses; a tokenizer lacking one cannot train.
REQUIRED_SPECIAL_TOKENS = (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    IM_START_TOKEN,
    IM_END_TOKEN,
    SEMANTIC_TOKEN,
    SKIP_TEXT_TOKEN,
)


class TokenizerError(ValueError):
    """The tokenizer files are missing or lack a special token fishtune needs."""


@dataclass
class FishTokenizer:
    """A byte-level BPE tokenizer plus the special-token ids the dual-AR format needs."""

    tokenizer: Tokenizer
    source_dir: Path | None = None

    def __post_init__(self) -> None:
        missing = [t for t in REQUIRED_SPECIAL_TOKENS if self.tokenizer.token_to_id(t) is None]
        if missing:
            raise TokenizerError(
                f"tokenizer{f' {self.source_dir / TOKENIZER_FILES[0]}' if self.source_dir else ''} lacks the "
                f"special tokens {missing}; use the tokenizer shipped with fish-speech-1.4"
            )

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "FishTokenizer":
        folder = Path(path)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(
                f"{file} not found: a Fish Speech checkpoint folder must contain tokenizer.json"
            )
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as err:  # noqa: BLE001 - the tokenizers library raises plain Exception
            reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise TokenizerError(
                f"{file} is not a tokenizers JSON file ({reason}); copy tokenizer.json from the "
                "released fish-speech-1.4 checkpoint"
            ) from None
        return cls(tokenizer, source_dir=folder)

    def encode(self, text: str) -> list[int]:
        """Ids without added special tokens (special tokens inside ``text`` stay single ids)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"token {token!r} is not in the vocabulary")
        return token_id

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self.token_id(BOS_TOKEN)

    @property
    def eos_id(self) -> int:
        return self.token_id(EOS_TOKEN)

    @property
    def pad_id(self) -> int:
        return self.token_id(PAD_TOKEN)

    @property
    def im_start_id(self) -> int:
        return self.token_id(IM_START_TOKEN)

    @property
    def im_end_id(self) -> int:
        return self.token_id(IM_END_TOKEN)

    @property
    def semantic_id(self) -> int:
        return self.token_id(SEMANTIC_TOKEN)

    @property
    def skip_text_id(self) -> int:
        return self.token_id(SKIP_TEXT_TOKEN)

    def save(self, path: str | os.PathLike) -> None:
        """Write the three tokenizer files into ``path`` (copied byte for byte when we have them)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            source = self.source_dir / name if self.source_dir else None
            with atomic_path(folder / name) as tmp:
                if source is not None and source.is_file():
                    shutil.copyfile(source, tmp)
                elif name == "tokenizer.json":
                    self.tokenizer.save(str(tmp), pretty=True)
                else:
                    tmp.write_text(json.dumps(self._transformers_config(name), indent=2) + "\n")

    def _transformers_config(self, name: str) -> dict:
        """The transformers-side files, for tokenizers we built ourselves (e.g. init-base)."""
        additional = [
            t
            for t in (IM_START_TOKEN, IM_END_TOKEN, SEMANTIC_TOKEN, MEL_TOKEN,
                      PHONEME_START_TOKEN, PHONEME_END_TOKEN, SKIP_TEXT_TOKEN)
            if self.tokenizer.token_to_id(t) is not None
        ]
        special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
        if name == "special_tokens_map.json":
            return {"additional_special_tokens": additional, **special}
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "additional_special_tokens": additional,
            "model_max_length": 1000000000000000019884624838656,
            **special,
        }
