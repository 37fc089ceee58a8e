"""The LoRA dropout folded into lora_A gives autograd's values and gradients of dropout-then-A."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from fish_speech_core.finetune.dropout import DroppedLoraA, _DroppedProjection, use_sample_dropout
from fish_speech_core.finetune.lora import LoraSettings, add_lora, lora_state_dict


def test_folded_dropout_equals_dropout_then_linear():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=gen, requires_grad=True)
    w = torch.randn(4, 16, generator=gen, requires_grad=True)
    keep = torch.rand(3, 5, 16, generator=gen) >= 0.3
    grad_out = torch.randn(3, 5, 4, generator=gen)
    scale = 1 / 0.7

    ours = _DroppedProjection.apply(x, w, keep, scale)
    gx, gw = torch.autograd.grad(ours, (x, w), grad_out)
    # what peft + a separate mask dropout computed before the fold
    plain = F.linear(torch.where(keep, x * scale, torch.zeros(())), w)
    px, pw = torch.autograd.grad(plain, (x, w), grad_out)
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)
    torch.testing.assert_close(gx, px, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw, pw, rtol=1e-6, atol=1e-6)


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
