"""Awkward transcripts are handled the same way by validate, pack and training-sample cleaning.

See docs/hardening.md ("Transcripts") for the rules these tests pin down.
"""

import numpy as np
import pytest

from fish_speech_core import dataset as ds
from fish_speech_core.formats.protos import iter_text_data
from fish_speech_core.formats.text import clean_pack_transcript, clean_text, has_spoken_content, training_text
from fish_speech_core.pack import pack
from fish_speech_core.tokenizer import FishTokenizer
from fish_speech_core.validate import validate
from tests.audio_factory import write_clip

SECONDS = 1.5
KEPT = {
    "mixed": "Hello 你好, こんにちは Привет 123",
    "rtl": "שלום עולם, مرحبا بالعالم",
    "zero-width-inside": "क्\u200dष hello\u200bworld",  # ZWJ shapes Devanagari: kept as is
}
EMPTY = {
    "punctuation": "...!?¿ -- ,,",
    "zero-width": "\u200b\u200d\ufeff\u2060",
    "tags-only": "{laugh} <breath>",
    "emoji": "😀😀 🚀",
}
TOO_LONG = {"long": "word " * 200}  # 1000 characters for 1.5 s of audio


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("transcripts") / "data"
    for index, (stem, text) in enumerate({**KEPT, **EMPTY, **TOO_LONG}.items()):
        write_clip(root / "SPK" / f"{stem}.wav", SECONDS, text=None, seed=index)
        (root / "SPK" / f"{stem}.lab").write_text(text, encoding="utf-8")
        np.save(root / "SPK" / f"{stem}.npy", np.zeros((8, 10), np.int64))
    return root


def test_spoken_content_rule():
    for text in KEPT.values():
        assert has_spoken_content(text)
    for text in EMPTY.values():
        assert not has_spoken_content(text), repr(text)
    assert training_text("{laugh} Hi <b>there</b>") == "Hi there"


def test_validate_rejects_empty_after_cleaning_and_too_long(data):
    records = {r.path: r for r in validate(data, show_progress=False).records}
    for stem, text in KEPT.items():
        record = records[f"SPK/{stem}.wav"]
        assert (record.status, record.transcript) == ("accepted", text), stem
    for stem in EMPTY:
        record = records[f"SPK/{stem}.wav"]
        assert (record.status, record.reason) == ("rejected", ds.EMPTY_TRANSCRIPT), stem
        assert "no letters or digits after cleaning" in record.detail
    record = records["SPK/long.wav"]
    assert (record.status, record.reason) == ("rejected", ds.TRANSCRIPT_TOO_LONG)
    assert record.detail.startswith("999 characters for 1.50 s")  # clean_text strips the last space


def test_pack_keeps_the_same_items_and_their_exact_text(data, tmp_path):
    summary = pack([data], tmp_path / "out", num_workers=1)
    rejected = sorted(r.item.rsplit("/", 1)[-1] for r in summary.rejects)
    assert rejected == sorted(f"{stem}.lab" for stem in EMPTY)
    assert all("no letters or digits" in r.reason for r in summary.rejects)
    texts = [s.texts[0] for td in iter_text_data(tmp_path / "out") for s in td.sentences]
    # pack cannot see durations: the over-long line is packed, validate is its gate (documented)
    expected = {clean_pack_transcript(t) for t in {**KEPT, **TOO_LONG}.values()}
    assert sorted(texts) == sorted(expected)


def test_training_text_round_trips_through_the_tokenizer(reference):
    tokenizer = FishTokenizer.from_dir(reference / "tokenizer")
    for text in KEPT.values():
        cleaned = clean_text(clean_pack_transcript(text))
        assert cleaned == text  # mixed scripts, RTL and zero-width joiners pass unchanged
        assert tokenizer.decode(tokenizer.encode(cleaned)) == cleaned
