import json
import weakref

import pytest
import torch

from fish_speech_core.lm import PRESETS, DualARTransformer, lm_losses, load_pretrained
from fish_speech_core.lm.config import DualARConfig

ATOL = 1e-5  # README "Determinism and observed tolerances": fp32 logits and losses


@pytest.fixture(scope="module")
def batch(reference):
    return torch.load(reference / "tiny-llama-forward.pt", weights_only=True)


def load_tiny(reference, impl="sdpa"):
    model = load_pretrained(reference / "tiny-llama", attention_impl=impl).model
    return model.float().eval()


@pytest.mark.parametrize("impl", ["sdpa", "explicit"])
def test_forward_matches_reference_logits(reference, batch, impl):
    model = load_tiny(reference, impl)
    with torch.no_grad():
        out = model(batch["inputs"], batch["attention_masks"])
    assert out.token_logits.shape == (2, 70, 904)
    assert out.codebook_logits.shape == (2, 70, 8, 1024)
    torch.testing.assert_close(out.token_logits, batch["token_logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.codebook_logits, batch["codebook_logits"], atol=ATOL, rtol=0)


def test_skipped_rows_have_exactly_zero_codebook_logits(reference, batch):
    model = load_tiny(reference)
    with torch.no_grad():
        out = model(batch["inputs"], batch["attention_masks"])
    zero = (out.codebook_logits == 0).all(dim=-1).all(dim=-1)  # (B, T)
    assert torch.equal(zero, (batch["codebook_logits"] == 0).all(dim=-1).all(dim=-1))
    # README section 3: skipped b0: 0-26 and 36-69, b1: 0-43 and 69.
    expected = torch.ones(2, 70, dtype=torch.bool)
    expected[0, 27:36] = False
    expected[1, 44:69] = False
    assert torch.equal(zero, expected)


def test_losses_match_reference(reference, batch):
    model = load_tiny(reference)
    with torch.no_grad():
        out = model(batch["inputs"], batch["attention_masks"])
    losses = lm_losses(out.token_logits, out.codebook_logits, batch["labels"])
    for name in ("base_loss", "semantic_loss", "loss", "top_5_accuracy"):
        torch.testing.assert_close(getattr(losses, name), batch[name], atol=ATOL, rtol=0)


def test_gradient_checkpointing_changes_nothing(reference, batch):
    plain = load_tiny(reference).train()
    ckpt_config = DualARConfig.from_dict({**plain.config.to_dict(), "use_gradient_checkpointing": True})
    checkpointed = DualARTransformer(ckpt_config, plain.semantic_token_id)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.train()
    grads = []
    for model in (plain, checkpointed):
        out = model(batch["inputs"], batch["attention_masks"])
        lm_losses(out.token_logits, out.codebook_logits, batch["labels"]).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=0, msg=name)


def test_every_parameter_gets_a_gradient(reference, batch):
    model = load_tiny(reference).train()
    out = model(batch["inputs"], batch["attention_masks"])
    lm_losses(out.token_logits, out.codebook_logits, batch["labels"]).loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()] == []


def test_real_size_preset_matches_reference_shapes(reference):
    shape = json.loads((reference / "llama-real-shape.json").read_text())
    with torch.device("meta"):
        model = DualARTransformer(PRESETS["fish-speech-1.4"], semantic_token_id=5)
    state = model.state_dict()
    assert len(state) == shape["num_state_dict_keys"] == 203
    assert {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in state.items()} == shape["state_dict"]
    assert list(state) == list(shape["state_dict"])  # same key order as the reference file
    assert sum(p.numel() for p in model.parameters()) == shape["total_parameters"] == 494_462_976


def test_semantic_token_id_must_be_in_vocab():
    with pytest.raises(ValueError, match="semantic_token_id 904"):
        DualARTransformer(PRESETS["tiny"], semantic_token_id=904)


@pytest.mark.parametrize("impl", ["sdpa", "explicit"])
def test_no_mask_means_causal_without_padding(reference, batch, impl):
    model = load_tiny(reference, impl)
    inputs = batch["inputs"][1:]  # sample 1 has no padding
    with torch.no_grad():
        masked = model(inputs, torch.zeros(1, 70, dtype=torch.bool))
        unmasked = model(inputs)
        prefix = model(inputs[..., :40])  # causal: the future cannot change the past
    torch.testing.assert_close(unmasked.token_logits, masked.token_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(unmasked.codebook_logits, masked.codebook_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(prefix.token_logits, masked.token_logits[:, :40], atol=1e-6, rtol=0)


def test_bad_input_shapes_are_clear_errors(reference, batch):
    model = load_tiny(reference)
    with pytest.raises(ValueError, match=r"inputs must be \(B, 9, T\)"):
        model(batch["inputs"][:, :5])
    with pytest.raises(ValueError, match="key_padding_mask must be bool"):
        model(batch["inputs"], batch["attention_masks"].long())


def test_tied_word_embeddings_reuse_the_embedding_table(reference, batch):
    tied = DualARConfig.from_dict({**PRESETS["tiny"].to_dict(), "tie_word_embeddings": True})
    model = DualARTransformer(tied, semantic_token_id=5).eval()
    assert "output.weight" not in model.state_dict()
    with torch.no_grad():
        out = model(batch["inputs"], batch["attention_masks"])
        expected = model.norm(out.hidden_states) @ model.embeddings.weight.T
    torch.testing.assert_close(out.token_logits, expected)


def test_merged_lora_checkpoint_matches_its_reference_forward(reference, batch):
    # README 5: loading lora/merged/ gives the logits of lora-forward.pt exactly.
    expected = torch.load(reference / "lora" / "lora-forward.pt", weights_only=True)
    model = load_pretrained(reference / "lora" / "merged").model.eval()
    with torch.no_grad():
        out = model(batch["inputs"], batch["attention_masks"])
    torch.testing.assert_close(out.token_logits, expected["token_logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.codebook_logits, expected["codebook_logits"], atol=ATOL, rtol=0)
    losses = lm_losses(out.token_logits, out.codebook_logits, batch["labels"])
    for name in ("base_loss", "semantic_loss", "loss", "top_5_accuracy"):
        torch.testing.assert_close(getattr(losses, name), expected[name], atol=ATOL, rtol=0)


def test_teacher_forced_forward_matches_the_generation_steps(reference):
    # README generate/teacher-forced.pt: a full non-cached forward over prompt + continuation
    # reproduces the per-step slow logits, pre-norm hidden states and fast logits.
    steps = torch.load(reference / "generate" / "teacher-forced.pt", weights_only=True)
    model = load_tiny(reference)
    inputs = torch.cat([steps["prompt"], steps["continuation"]], dim=1).long()[None]  # (1, 9, 53)
    with torch.no_grad():
        out = model(inputs, torch.zeros(1, 53, dtype=torch.bool))
    last = steps["prompt_length"] - 1
    torch.testing.assert_close(out.token_logits[0, last], steps["prefill_logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.hidden_states[0, last], steps["prefill_hidden_states"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.token_logits[0, last + 1 :], steps["step_slow_logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.hidden_states[0, last + 1 :], steps["step_hidden_states"], atol=ATOL, rtol=0)
    # Step i's fast transformer sees hidden(last + i) and the codes of continuation column i.
    torch.testing.assert_close(out.codebook_logits[0, last : last + 11], steps["step_fast_logits"][:11], atol=ATOL, rtol=0)
    assert torch.equal(out.codebook_logits[0, last + 11], torch.zeros(8, 1024))  # all codes 0: skipped


def test_swiglu_gradients_equal_autograds():
    from fish_speech_core.lm.model import _SwiGLU

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 7, 32, generator=gen, requires_grad=True)
    b = torch.randn(4, 7, 32, generator=gen, requires_grad=True)
    grad = torch.randn(4, 7, 32, generator=gen)
    ours = _SwiGLU.apply(a, b)
    plain = torch.nn.functional.silu(a) * b
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)
    for mine, theirs in zip(torch.autograd.grad(ours, (a, b), grad), torch.autograd.grad(plain, (a, b), grad)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_cross_entropy_sum_equals_torchs_with_ignored_rows_and_more_rows_than_a_chunk():
    from fish_speech_core.lm.loss import _CHUNK_ROWS, cross_entropy_sum

    gen = torch.Generator().manual_seed(0)
    rows = 2 * _CHUNK_ROWS + 37  # a partial last chunk
    logits = (torch.randn(rows, 300, generator=gen) * 4).requires_grad_()
    labels = torch.randint(0, 300, (rows,), generator=gen)
    labels[::5] = -100
    ours = cross_entropy_sum(logits, labels)
    plain = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-4)
    mine, = torch.autograd.grad(ours * 0.3, logits)
    theirs, = torch.autograd.grad(plain * 0.3, logits)
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert torch.equal(mine[::5], torch.zeros_like(mine[::5]))  # ignored rows get no gradient
    scratch = logits.detach().clone().requires_grad_()
    view = scratch * 1.0  # a non-leaf the loss may overwrite, as a training step's logits
    again, = torch.autograd.grad(cross_entropy_sum(view, labels, overwrite=True) * 0.3, scratch)
    torch.testing.assert_close(again, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_training_loss_sums_equal_the_plain_losses_and_gradients_without_keeping_the_token_logits(reference, batch, tied):
    """The training step's fused token head (gradients computed in forward) against model() + lm_loss_sums."""
    from fish_speech_core.lm.loss import lm_loss_sums, training_loss_sums

    plain = load_tiny(reference).train()
    if tied:
        config = DualARConfig.from_dict({**plain.config.to_dict(), "tie_word_embeddings": True})
        plain = DualARTransformer(config, plain.semantic_token_id).train()
    fused = DualARTransformer(plain.config, plain.semantic_token_id).train()
    fused.load_state_dict(plain.state_dict())
    out = plain(batch["inputs"], batch["attention_masks"])
    want = lm_loss_sums(out.token_logits, out.codebook_logits, batch["labels"])
    (want.text_sum / 3 + want.code_sum / 5).backward()
    vocab = plain.config.vocab_size
    saved = []  # what the graph keeps for backward (the head's own inner graph is gone by then)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(weakref.ref(t)) or t, lambda t: t):
        got = training_loss_sums(fused, batch["inputs"], batch["attention_masks"], batch["labels"])
    kept = [tuple(t.shape) for t in (r() for r in saved) if t is not None]
    assert kept and not [shape for shape in kept if shape and shape[-1] == vocab]  # no (rows, vocab) logits
    (got.text_sum / 3 + got.code_sum / 5).backward()
    torch.testing.assert_close(got.stats(), want.stats(), atol=1e-4, rtol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        assert q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
