import json

import pytest

from fish_speech_core.tokenizer import FishTokenizer, TokenizerError


def test_encodes_fixture_samples_like_the_reference(reference):
    samples = json.loads((reference / "tokenizer" / "encode-samples.json").read_text())
    tok = FishTokenizer.from_dir(reference / "tokenizer")
    assert len(tok) == samples["len_tokenizer"] == 900
    for token, token_id in samples["special_token_ids"].items():
        assert tok.token_id(token) == token_id
    assert (tok.eos_id, tok.pad_id, tok.semantic_id, tok.im_start_id, tok.im_end_id) == (1, 2, 5, 3, 4)
    for sample in samples["samples"]:
        assert tok.encode(sample["text"]) == sample["ids_add_special_tokens_false"]
        assert tok.decode(sample["ids_add_special_tokens_false"]) == sample["decoded"]


def test_save_copies_the_three_files_byte_for_byte(reference, tmp_path):
    FishTokenizer.from_dir(reference / "tokenizer").save(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (reference / "tokenizer" / name).read_bytes()


def test_missing_tokenizer_file_says_what_to_do(tmp_path):
    with pytest.raises(TokenizerError, match="must contain tokenizer.json"):
        FishTokenizer.from_dir(tmp_path)
