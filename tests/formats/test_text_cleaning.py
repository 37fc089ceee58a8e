import json

import pytest
import torch

from fish_speech_core.formats.text import clean_pack_transcript, clean_text


def _clean_text_cases(reference):
    return json.loads((reference / "clean-text.json").read_text(encoding="utf-8"))


def test_clean_text_matches_every_reference_case(reference):
    cases = _clean_text_cases(reference)
    assert len(cases) == 6
    for case in cases:
        assert clean_text(case["input"]) == case["expected"], case["input"]


def test_clean_text_matches_the_generation_prompt_cases(reference):
    prompt_cases = torch.load(reference / "generate" / "prompt-cases.pt", weights_only=True)["cases"]
    for case in prompt_cases:
        assert clean_text(case["string"]) == case["cleaned_string"], case["name"]


@pytest.mark.parametrize("kept", ["，", "！", "。", "❤️", '"'])
def test_clean_text_leaves_the_deliberately_unmapped_characters(kept):
    assert clean_text(f"a{kept}b") == f"a{kept}b"


def test_pack_cleaning_matches_the_decoded_reference_pack(reference):
    expected = json.loads((reference / "protos" / "expected-decoded.json").read_text(encoding="utf-8"))
    dataset = reference / "protos" / "dataset"
    for group in expected:
        labs = sorted((dataset / group["name"]).glob("*.lab"))
        got = [clean_pack_transcript(p.read_text(encoding="utf-8")) for p in labs]
        assert got == [s["texts"][0] for s in group["sentences"]]


def test_pack_cleaning_is_non_greedy_and_ordered():
    # Non-greedy: two tags stay two gaps, text between them survives; whitespace collapses last.
    assert clean_pack_transcript("a {x} b {y} c <p> d <q/>\te\n") == "a b c d e "
