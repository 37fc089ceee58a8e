"""Generation parity with the reference fixtures (README Addendum 2, ``generate/``)."""

import pytest
import torch

from fish_speech_core.formats.text import clean_text
from fish_speech_core.lm import load_pretrained
from fish_speech_core.lm.generate import (
    SamplingSettings,
    encode_prompt,
    fast_step,
    generate,
    generate_uncached,
    logits_to_probs,
    new_fast_cache,
    new_slow_cache,
    semantic_codes,
    slow_step,
)
from fish_speech_core.tokenizer import FishTokenizer

ATOL_LOGITS = 1e-5  # README: "Suggested tolerance: atol 1e-5"


def load_tiny(reference, overrides=None):
    model = load_pretrained(reference / "tiny-llama").model.float().eval()
    if overrides:
        model.load_state_dict({**model.state_dict(), **overrides})
    return model


@pytest.fixture(scope="module")
def gen_dir(reference):
    return reference / "generate"


def test_prompt_cases_match_exactly(reference, gen_dir):
    data = torch.load(gen_dir / "prompt-cases.pt", weights_only=True)
    tokenizer = FishTokenizer.from_dir(reference / data["tokenizer_folder"])
    for key, value in data["special_token_ids"].items():
        assert tokenizer.token_id(key) == value
    assert len(data["cases"]) == 3
    for case in data["cases"]:
        assert clean_text(case["string"]) == case["cleaned_string"]
        out = encode_prompt(tokenizer, case["string"], case["prompt_tokens"], case["num_codebooks"])
        assert out.dtype == case["output"].dtype, case["name"]
        assert torch.equal(out, case["output"]), case["name"]
    # int64 codes promote the result to int64 with the same values.
    case = data["cases"][1]
    out = encode_prompt(tokenizer, case["string"], case["prompt_tokens"].long())
    assert out.dtype == torch.int64 and torch.equal(out, case["output"].long())


def test_logits_to_probs_all_cases(gen_dir):
    data = torch.load(gen_dir / "logits-to-probs.pt", weights_only=True)
    assert len(data["cases"]) == 36
    for i, case in enumerate(data["cases"]):
        logits = case["logits"].clone()
        probs = logits_to_probs(
            logits,
            case["previous_tokens"],
            temperature=torch.tensor(case["temperature"]),
            top_p=torch.tensor(case["top_p"]),
            repetition_penalty=torch.tensor(case["repetition_penalty"]),
        )
        # In-place edit: the penalty is scattered back into the caller's tensor.
        assert torch.equal(logits, case["logits_after_call"]), i
        if case["top_p"] == 1.0:
            # The least likely token may be dropped or kept by float rounding (README).
            torch.testing.assert_close(probs, case["probs"], atol=5e-5, rtol=0)
        else:
            assert int((probs > 0).sum()) == case["num_nonzero_probs"], i
            assert torch.equal(probs > 0, case["probs"] > 0), i
            torch.testing.assert_close(probs, case["probs"], atol=1e-6, rtol=0)


def test_cached_steps_match_teacher_forced_logits(reference, gen_dir):
    steps = torch.load(gen_dir / "teacher-forced.pt", weights_only=True)
    model = load_tiny(reference)
    t = steps["prompt_length"]
    slow = new_slow_cache(model, 512)
    fast = new_fast_cache(model)
    with torch.inference_mode():
        logits, hidden = slow_step(model, steps["prompt"][None], 0, slow)
        torch.testing.assert_close(logits[0], steps["prefill_logits"], atol=ATOL_LOGITS, rtol=0)
        torch.testing.assert_close(hidden[0], steps["prefill_hidden_states"], atol=ATOL_LOGITS, rtol=0)
        cont = steps["continuation"]
        for i in range(cont.size(1)):
            fast.clear()
            x = model.fast_project_in(hidden)[:, None]
            for c in range(8):
                got = fast_step(model, x, c, fast)[0]
                torch.testing.assert_close(got, steps["step_fast_logits"][i, c], atol=ATOL_LOGITS, rtol=0)
                x = model.fast_embeddings(cont[c + 1, i].long().view(1, 1))
            logits, hidden = slow_step(model, cont[:, i].view(1, 9, 1), t + i, slow)
            torch.testing.assert_close(logits[0], steps["step_slow_logits"][i], atol=ATOL_LOGITS, rtol=0)
            torch.testing.assert_close(hidden[0], steps["step_hidden_states"][i], atol=ATOL_LOGITS, rtol=0)


def _run_greedy(model, data, seed):
    s = data["settings"]
    settings = SamplingSettings(s["temperature"], s["top_p"], s["repetition_penalty"])
    token_logits, codebook_logits, windows = [], [], []
    result = generate(
        model,
        data["prompt"],
        im_end_id=s["im_end_id"],
        max_new_tokens=s["max_new_tokens"],
        settings=settings,
        generator=torch.Generator().manual_seed(seed),
        on_logits=lambda t, c: (token_logits.append(t), codebook_logits.append(c)),
        on_window=windows.append,
    )
    return result, token_logits, codebook_logits, windows


@pytest.mark.parametrize("name", ["greedy.pt", "greedy-edited-model.pt"])
def test_generation_reproduces_reference_sequences(reference, gen_dir, name):
    data = torch.load(gen_dir / name, weights_only=True)
    model = load_tiny(reference, data.get("state_dict_overrides"))
    result, token_logits, codebook_logits, windows = _run_greedy(model, data, seed=0)
    assert result.sequence.dtype == torch.int32
    assert torch.equal(result.sequence, data["sequence"])
    assert result.new_tokens == data["sequence"].size(1) - data["prompt_length"]
    n = len(token_logits)
    torch.testing.assert_close(torch.stack(token_logits), data["debug_token_logits"][:n], atol=ATOL_LOGITS, rtol=0)
    torch.testing.assert_close(torch.stack(codebook_logits), data["debug_codebook_logits"][:n], atol=ATOL_LOGITS, rtol=0)
    for got, want in zip(windows, data["debug_codebook_windows"]):
        assert (got is None) == (want is None)
        if want is not None:
            assert torch.equal(got, want)
    # Deterministic for any seed (one-hot probs) -- also a check that our generator is used.
    again, *_ = _run_greedy(model, data, seed=123)
    assert torch.equal(again.sequence, data["sequence"])


def test_edited_model_emits_codes_and_stops_at_im_end(reference, gen_dir):
    data = torch.load(gen_dir / "greedy-edited-model.pt", weights_only=True)
    model = load_tiny(reference, data["state_dict_overrides"])
    result, *_ = _run_greedy(model, data, seed=0)
    new = result.sequence[:, result.prompt_length :]
    assert new[0, -1] == 4 and new.size(1) == 39
    codes = semantic_codes(result, semantic_id=5, codebook_size=1000)
    semantic = new[:, new[0] == 5]
    assert codes.shape == (8, 25)
    assert torch.equal(codes, (semantic[1:].long() - 1).clamp(0, 999))
    assert torch.all(new[1:, new[0] != 5] == 0)


def test_uncached_generation_equals_cached(reference, gen_dir):
    data = torch.load(gen_dir / "greedy-edited-model.pt", weights_only=True)
    model = load_tiny(reference, data["state_dict_overrides"])
    s = data["settings"]
    settings = SamplingSettings(s["temperature"], s["top_p"], s["repetition_penalty"])
    result = generate_uncached(model, data["prompt"], 4, 40, settings, torch.Generator().manual_seed(0))
    assert torch.equal(result.sequence, data["sequence"])


def test_seeded_sampling_is_reproducible(reference, gen_dir):
    data = torch.load(gen_dir / "greedy.pt", weights_only=True)
    model = load_tiny(reference)
    settings = SamplingSettings(temperature=1.0, top_p=0.9, repetition_penalty=1.2)

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return generate(model, data["prompt"], 4, 20, settings, gen).sequence

    first = run(3)
    assert torch.equal(first, run(3))
    assert not torch.equal(first, run(4))


def test_bf16_model_generates_with_fp32_sampling(reference, gen_dir):
    # The CUDA path runs the model in bf16; sampling still sees fp32 logits.
    data = torch.load(gen_dir / "greedy-edited-model.pt", weights_only=True)
    model = load_tiny(reference, data["state_dict_overrides"]).to(torch.bfloat16)
    result = generate(model, data["prompt"], 4, 8, SamplingSettings(), torch.Generator().manual_seed(0))
    assert result.sequence.dtype == torch.int32 and result.new_tokens == 8
    assert torch.equal(result.sequence[:, :41], data["prompt"])


def test_cached_steps_work_on_a_peft_lora_model(reference, gen_dir):
    # LoRA applied on the fly (peft layers inside the model) must flow through the cached path:
    # cached per-step logits equal the same model's full teacher-forced forward.
    from peft import LoraConfig, inject_adapter_in_model

    steps = torch.load(gen_dir / "teacher-forced.pt", weights_only=True)
    model = load_tiny(reference)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["wqkv", "wo", "w1", "w2", "w3", "output", "fast_output"])
    model = inject_adapter_in_model(config, model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    model.eval()
    inputs = torch.cat([steps["prompt"], steps["continuation"]], dim=1).long()[None]
    with torch.no_grad():
        full = model(inputs, torch.zeros(1, inputs.size(2), dtype=torch.bool))
        base = load_tiny(reference)(inputs, torch.zeros(1, inputs.size(2), dtype=torch.bool))
    assert (full.token_logits - base.token_logits).abs().max() > 1e-3  # the adapter matters
    t = steps["prompt_length"]
    cache = new_slow_cache(model, 64)
    with torch.inference_mode():
        logits, _ = slow_step(model, steps["prompt"][None], 0, cache)
        torch.testing.assert_close(logits[0], full.token_logits[0, t - 1], atol=ATOL_LOGITS, rtol=0)
        for i in range(steps["continuation"].size(1)):
            logits, _ = slow_step(model, steps["continuation"][:, i].view(1, 9, 1), t + i, cache)
            torch.testing.assert_close(logits[0], full.token_logits[0, t + i], atol=ATOL_LOGITS, rtol=0)


def test_small_cpu_model_decodes_on_one_thread_and_restores_the_count(reference, gen_dir):
    # Tiny kernels lose to OpenMP's per-region cost; the caller's thread count comes back.
    data = torch.load(gen_dir / "greedy-edited-model.pt", weights_only=True)
    model = load_tiny(reference, data["state_dict_overrides"])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        s = data["settings"]
        result = generate(model, data["prompt"], s["im_end_id"], s["max_new_tokens"],
                          SamplingSettings(s["temperature"], s["top_p"], s["repetition_penalty"]),
                          torch.Generator().manual_seed(0),
                          on_step=lambda n: seen.append(torch.get_num_threads()))
        assert set(seen) == {1} and torch.get_num_threads() == 2
        assert torch.equal(result.sequence, data["sequence"])
    finally:
        torch.set_num_threads(before)
