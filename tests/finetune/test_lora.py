"""LoRA parity with the reference (fixtures README section 5) and litgpt-style invariants."""

from __future__ import annotations

import pytest
import torch

from fish_speech_core.finetune.lora import (
    TARGET_NAMES,
    LoraError,
    LoraMetadata,
    LoraSettings,
    add_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
    read_adapter,
)
from fish_speech_core.lm import lm_losses, load_pretrained

ATOL_LOGITS = 1e-4
ATOL_MERGE = 1e-6
SETTINGS = LoraSettings(r=8, alpha=16, dropout=0.0)


@pytest.fixture(scope="module")
def batch(reference):
    return torch.load(reference / "tiny-llama-forward.pt", weights_only=True)


@pytest.fixture(scope="module")
def expected(reference):
    return torch.load(reference / "lora" / "lora-forward.pt", weights_only=True)


def lora_model(reference):
    model = add_lora(load_pretrained(reference / "tiny-llama").model, SETTINGS)
    load_lora_state_dict(model, read_adapter(reference / "lora" / "lora-ckpt.ckpt").tensors)
    return model


def test_targets_are_exactly_the_reference_modules(reference):
    model = add_lora(load_pretrained(reference / "tiny-llama").model, "r_8_alpha_16")
    wrapped = sorted({n.split(".lora_")[0] for n, _ in lora_parameters(model)})
    ckpt = torch.load(reference / "lora" / "lora-ckpt.ckpt", weights_only=True)["state_dict"]
    ref = sorted({k.removeprefix("model.").rsplit(".lora_", 1)[0] for k in ckpt})
    assert wrapped == ref
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == set(TARGET_NAMES)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in lora_parameters(model)}


def test_forward_and_losses_match_reference(reference, batch, expected):
    model = lora_model(reference).eval()
    with torch.no_grad():
        out = model(batch["inputs"], batch["attention_masks"])
    torch.testing.assert_close(out.token_logits, expected["token_logits"], atol=ATOL_LOGITS, rtol=0)
    torch.testing.assert_close(out.codebook_logits, expected["codebook_logits"], atol=ATOL_LOGITS, rtol=0)
    losses = lm_losses(out.token_logits, out.codebook_logits, batch["labels"])
    for name in ("base_loss", "semantic_loss", "loss", "top_5_accuracy"):
        torch.testing.assert_close(getattr(losses, name), expected[name], atol=ATOL_LOGITS, rtol=0)


def test_eval_does_not_merge(reference):
    model = lora_model(reference)
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    model.eval()
    after = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_merge_reproduces_reference_merged_weights(reference):
    merged = merge_lora(lora_model(reference)).state_dict()
    ref = torch.load(reference / "lora" / "merged" / "model.pth", weights_only=True)
    assert list(merged) == list(ref)
    for key, tensor in ref.items():
        assert merged[key].dtype == tensor.dtype, key
        torch.testing.assert_close(merged[key], tensor, atol=ATOL_MERGE, rtol=0)


def test_merge_is_w_plus_scaled_ba_and_idempotent(reference):
    base = load_pretrained(reference / "tiny-llama").model.state_dict()
    adapters = read_adapter(reference / "lora" / "lora-ckpt.ckpt").tensors
    model = merge_lora(lora_model(reference))
    once = {k: v.clone() for k, v in model.state_dict().items()}
    expect = merged_state_dict(base, adapters, SETTINGS)
    for key in once:
        torch.testing.assert_close(once[key], expect[key], atol=ATOL_MERGE, rtol=0)
    twice = merge_lora(model).state_dict()
    assert all(torch.equal(once[k], twice[k]) for k in once)
    assert not any("lora_" in k for k in twice)


def test_adapter_state_dict_round_trips_and_holds_only_adapters(reference):
    model = lora_model(reference)
    state = lora_state_dict(model)
    ref = {k.removeprefix("model."): v for k, v in torch.load(
        reference / "lora" / "lora-ckpt.ckpt", weights_only=True)["state_dict"].items()}
    assert list(state) == list(ref)
    assert all(torch.equal(state[k], ref[k]) for k in ref)


def test_load_names_bad_tensors(reference):
    model = add_lora(load_pretrained(reference / "tiny-llama").model, SETTINGS)
    adapters = dict(read_adapter(reference / "lora" / "lora-ckpt.ckpt").tensors)
    adapters.pop("output.lora_A")
    adapters["wrong.lora_B"] = torch.zeros(1)
    with pytest.raises(LoraError, match=r"missing keys \['output.lora_A'\].*unexpected keys \['wrong.lora_B'\]"):
        load_lora_state_dict(model, adapters)


def test_metadata_mismatch_is_named():
    meta = LoraMetadata(r=8, alpha=16, dropout=0.01, base_sha256="a" * 64)
    meta.check(LoraSettings.from_name("r_8_alpha_16"), base_sha256="a" * 64)
    with pytest.raises(LoraError, match="r: adapter has 8, requested 4.*base checkpoint"):
        meta.check(LoraSettings(r=4, alpha=16, dropout=0.01), base_sha256="b" * 64)


def test_bad_settings_are_reported_together():
    with pytest.raises(LoraError, match="r must be.*alpha must be.*dropout must be"):
        LoraSettings(r=0, alpha=0, dropout=1.5)


def test_settings_of_the_wrong_type_are_refused(reference):
    with pytest.raises(TypeError, match="LoraSettings"):
        add_lora(load_pretrained(reference / "tiny-llama").model, object())
