import torch

from fish_speech_core.formats.prompt import (
    ATTENTION_MASK_TRUE_IS_PADDING,
    CODEBOOK_OFFSET,
    CODEBOOK_PAD_ID,
    IGNORE_INDEX,
    TEXT_PAD_TOKEN,
    turn_prompt,
)
from fish_speech_core.formats.text import clean_text
from fish_speech_core.tokenizer import FishTokenizer


def test_template_matches_the_generation_prompt_cases(reference):
    fixture = torch.load(reference / "generate" / "prompt-cases.pt", weights_only=True)
    tokenizer = FishTokenizer.from_dir(reference / fixture["tokenizer_folder"])
    for case in fixture["cases"]:
        text = clean_text(case["string"])
        assert turn_prompt(text) == case["templated_string"], case["name"]
        ids = tokenizer.encode(turn_prompt(text))
        assert case["output"][0, : len(ids)].tolist() == ids
        assert (case["output"][1:, : len(ids)] == CODEBOOK_PAD_ID).all()
        if case["prompt_tokens"] is not None:  # prompt codes follow as code + offset
            codes = case["output"][1:, len(ids) : len(ids) + case["prompt_tokens"].shape[1]]
            assert torch.equal(codes, case["prompt_tokens"] + CODEBOOK_OFFSET)


def test_constants_agree_with_the_fixture_batch(reference):
    forward = torch.load(reference / "tiny-llama-forward.pt", weights_only=True)
    tokenizer = FishTokenizer.from_dir(reference / "tokenizer")
    padding = forward["attention_masks"] if ATTENTION_MASK_TRUE_IS_PADDING else ~forward["attention_masks"]
    assert padding[0, 37:].all() and not padding[0, :37].any()  # example 0 is 37 long
    assert (forward["inputs"][0, 0, 37:] == tokenizer.token_id(TEXT_PAD_TOKEN)).all()
    assert (forward["labels"][0, :, 37:] == IGNORE_INDEX).all()


def test_speaker_and_skip_text():
    assert turn_prompt("hi", speaker="SPK1") == "<|im_start|>user\nhi<|im_end|><|im_start|>SPK1\n"
    assert turn_prompt("hi", skip_text=True) == "<|im_start|>user\n<|skip_text|><|im_end|><|im_start|>assistant\n"
