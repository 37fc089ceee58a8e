"""The fused LoRA Linear gives peft's values and gradients for the same dropped elements, and those
elements are a Bernoulli draw keyed by sample."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from fish_speech_core.finetune.dropout import (
    FAST, SLOW, DropoutContext, DroppedLoraA, dropped_positions, use_sample_dropout,
)
from fish_speech_core.finetune.lora_linear import FusedLoraLinear
from fish_speech_core.finetune.lora import LoraSettings, add_lora, lora_state_dict


def _dense(layer: LoraLinear, x: torch.Tensor, drop: torch.Tensor | None, p: float) -> torch.Tensor:
    """What peft computes with a separate dropout that drops exactly ``drop``."""
    keep = torch.ones(x.numel())
    if drop is not None:
        keep[drop] = 0.0
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    dropped = x * keep.view(x.shape) / (1 - p)
    return layer.base_layer(x) + F.linear(F.linear(dropped, a), b) * layer.scaling["default"]


@pytest.mark.parametrize("p", [0.3, 0.0])
def test_fused_lora_linear_equals_peft_with_the_same_dropped_elements(p):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("output", nn.Linear(16, 12, bias=True))  # a target name of TARGET_REGEX
    layer = add_lora(model, LoraSettings(dropout=p)).train().output
    assert isinstance(layer, FusedLoraLinear)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # B = 0 at the start would hide the adapter's terms
        layer.base_layer.weight.requires_grad_(True)  # a trainable base too, for its gradients
        layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(3, 5, 16, requires_grad=True)
    grad_out = torch.randn(3, 5, 12)
    torch.manual_seed(1)
    ours = layer(x)
    torch.manual_seed(1)  # the same draw of dropped elements for the dense formula
    drop = dropped_positions(x.numel(), p, None, x.device) if p else None
    plain = _dense(layer, x, drop, p)
    inputs = (x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"].weight,
              layer.lora_B["default"].weight)
    mine, theirs = torch.autograd.grad(ours, inputs, grad_out), torch.autograd.grad(plain, inputs, grad_out)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-5)
    if drop is not None:  # a dropped element's input gradient is exactly the base layer's
        assert drop.numel() > 0
        base_only = torch.autograd.grad(layer.base_layer(x), x, grad_out)[0]
        assert torch.equal(mine[0].reshape(-1)[drop], base_only.reshape(-1)[drop])


def test_dropped_positions_are_a_bernoulli_draw_keyed_by_its_generator():
    count, p = 200_000, 0.01
    first = dropped_positions(count, p, torch.Generator().manual_seed(5), torch.device("cpu"))
    again = dropped_positions(count, p, torch.Generator().manual_seed(5), torch.device("cpu"))
    other = dropped_positions(count, p, torch.Generator().manual_seed(6), torch.device("cpu"))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.dtype == torch.long and bool((first[1:] > first[:-1]).all())  # sorted, no repeats
    assert 0 <= int(first[0]) and int(first[-1]) < count
    assert abs(first.numel() - count * p) < 5 * (count * p * (1 - p)) ** 0.5
    # more draws than one chunk holds: the loop continues until the end of the range
    dense = dropped_positions(10_000, 0.5, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert abs(dense.numel() - 5_000) < 5 * 50 and int(dense[-1]) < 10_000
    assert dropped_positions(0, p, None, torch.device("cpu")).numel() == 0


def test_a_samples_dropped_elements_do_not_depend_on_its_place_in_the_batch():
    context = DropoutContext(seed=3)
    shape = torch.Size([2, 6, 4])  # slow layer: (B, T, in)
    context.set(torch.tensor([10, 11]), torch.tensor([6, 3]), torch.tensor([0, 0]))
    both = context.drop_index(shape, torch.device("cpu"), 0.5, layer=2, stack=SLOW)
    context.set(torch.tensor([11, 10]), torch.tensor([3, 6]), torch.tensor([0, 0]))
    swapped = context.drop_index(shape, torch.device("cpu"), 0.5, layer=2, stack=SLOW)
    width = 6 * 4
    sample = lambda idx, b: (idx[(idx >= b * width) & (idx < (b + 1) * width)] - b * width)
    assert torch.equal(sample(both, 0), sample(swapped, 1)) and torch.equal(sample(both, 1), sample(swapped, 0))
    assert int(sample(both, 1).max()) < 3 * 4  # padding positions (past the length) keep everything
    # fast layer: (rows, K, in), each sample owns a block of rows
    context.set(torch.tensor([10, 11]), torch.tensor([6, 3]), torch.tensor([2, 3]))
    fast = context.drop_index(torch.Size([5, 2, 4]), torch.device("cpu"), 0.5, layer=2, stack=FAST)
    context.set(torch.tensor([11]), torch.tensor([3]), torch.tensor([3]))
    alone = context.drop_index(torch.Size([3, 2, 4]), torch.device("cpu"), 0.5, layer=2, stack=FAST)
    assert torch.equal(fast[fast >= 2 * 8] - 2 * 8, alone)


def test_add_lora_folds_every_dropped_linear_and_keeps_names():
    def head() -> nn.Module:
        model = nn.Sequential()
        model.add_module("output", nn.Linear(8, 6, bias=False))  # a target name of TARGET_REGEX
        return model

    model, plain = add_lora(head(), LoraSettings(dropout=0.1)), add_lora(head(), LoraSettings(dropout=0.0))
    layer = model.output
    assert isinstance(layer, LoraLinear) and isinstance(layer.lora_A["default"], DroppedLoraA)
    assert isinstance(layer.lora_dropout["default"], nn.Identity)
    assert set(lora_state_dict(model)) == {"output.lora_A", "output.lora_B"}
    assert not isinstance(plain.output.lora_A["default"], DroppedLoraA)  # p = 0: peft's own layers
    context = use_sample_dropout(model, seed=3)
    assert layer.lora_A["default"].context is context
    x = torch.randn(2, 8)
    model.eval()  # no dropout in eval: the folded A is a plain projection
    torch.testing.assert_close(layer.lora_A["default"](x), x @ layer.lora_A["default"].weight.T)


def test_an_adapted_w2_rebuilds_its_swiglu_input_with_the_same_values_and_gradients():
    from fish_speech_core.lm.model import _silu_mul, _SwiGLU, linear_on

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("output", nn.Linear(16, 12, bias=False))
    layer = add_lora(model, LoraSettings(dropout=0.2)).train().output
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    a = torch.randn(4, 3, 16, requires_grad=True)
    b = torch.randn(4, 3, 16, requires_grad=True)
    grad_out = torch.randn(4, 3, 12)
    params = (a, b, layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    torch.manual_seed(1)
    ours = linear_on(layer, _SwiGLU.apply(a, b), _silu_mul, a, b)
    mine = torch.autograd.grad(ours, params, grad_out)
    torch.manual_seed(1)
    plain = layer(torch.nn.functional.silu(a) * b)
    theirs = torch.autograd.grad(plain, params, grad_out)
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)
    for x, y in zip(mine, theirs):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_an_adapted_layer_after_a_norm_rebuilds_the_normed_input_with_the_same_values_and_gradients():
    """TransformerBlock's projections keep the norm's input (kept by the norm anyway), not its output."""
    from fish_speech_core.lm.model import RMSNorm, linear_on

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fast_output", nn.Linear(16, 24, bias=False))  # a target name (after fast_norm)
    layer = add_lora(model, LoraSettings(dropout=0.2)).train().fast_output
    norm = RMSNorm(16, 1e-6)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        norm.weight.uniform_(0.5, 1.5)
    norm.weight.requires_grad_(False)  # frozen, as under LoRA
    x = torch.randn(4, 3, 16, requires_grad=True)
    grad_out = torch.randn(4, 3, 24)
    params = (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.manual_seed(1)
        ours = linear_on(layer, norm(x), norm, x)
    assert not any(t.shape == x.shape and not torch.equal(t, x) for t in saved)  # no normed copy kept
    mine = torch.autograd.grad(ours, params, grad_out)
    torch.manual_seed(1)
    plain = layer(norm(x))
    theirs = torch.autograd.grad(plain, params, grad_out)
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)
    for got, want in zip(mine, theirs):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
