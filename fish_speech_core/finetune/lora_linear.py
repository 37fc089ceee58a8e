"""One autograd function for a LoRA Linear: ``y = x Wᵀ + b + s·k·((x∘m) Aᵀ) Bᵀ``.

peft computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: every term is a fresh tensor
the size of the layer's input or output (the dropped input, the mask, the adapter's output, its
scaled copy, the sum). On a CPU those temporaries are most of a LoRA step's non-matmul time:
each large one is a fresh mapping whose pages fault in at every step, and memory-bound passes
over them (the fast transformer runs on ~13k rows per 2x1024 batch). Here the adapter's output
is added in place onto the base output (``addmm_``), and dropout never builds the dropped input:
``(x∘m) Aᵀ = x Aᵀ − (the dropped elements' terms)``, and at p = 0.01 the dropped elements are 1 %.
Backward saves ``x``, the (rows, r) adapter activation and the dropped indices, not a mask.

Values equal peft's up to float rounding (the test compares them); the layer keeps peft's class
as a base, so its state-dict names, ``merge`` and ``isinstance`` checks are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from torch import Tensor, nn

from fish_speech_core.finetune.dropout import ADAPTER, DroppedLoraA


class _LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                drop: Tensor | None, keep_scale: float, scaling: float,
                rebuild: Callable[..., Tensor] | None = None, *sources: Tensor) -> Tensor:
        width = x.shape[-1]
        x2 = x.reshape(-1, width)
        y = F.linear(x2, weight, bias)
        h = x2 @ lora_a.t()  # (rows, r)
        if drop is not None and drop.numel():
            rows, cols = drop // width, drop % width
            h.index_add_(0, rows, x2.reshape(-1)[drop].unsqueeze(1) * lora_a.t()[cols], alpha=-1)
        if keep_scale != 1.0:
            h.mul_(keep_scale)
        y.addmm_(h, lora_b.t(), alpha=scaling)
        # x = rebuild(*sources), whose producer keeps the sources for its own backward anyway (a
        # SwiGLU's two inputs, an RMSNorm's input): keep those and rebuild x in backward, instead of
        # one more (rows, width) tensor per layer
        ctx.rebuild = rebuild
        ctx.save_for_backward(weight, lora_a, lora_b, h, drop, *(sources if rebuild is not None else (x2,)))
        ctx.keep_scale, ctx.scaling, ctx.has_bias = keep_scale, scaling, bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, lora_a, lora_b, h, drop, *kept = ctx.saved_tensors
        if ctx.rebuild is None:
            (x2,) = kept
        else:
            x2 = ctx.rebuild(*kept)
            x2 = x2.reshape(-1, x2.shape[-1])
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        g2 = grad.reshape(-1, grad.shape[-1])
        dropped = drop is not None and drop.numel() > 0
        if dropped:
            width = x2.shape[1]
            rows, cols = drop // width, drop % width
        grad_x = grad_w = grad_bias = grad_a = grad_lb = None
        if need_lb:
            # (hᵀ g)ᵀ, not gᵀ h: with the long rows dimension inside, MKL ran the (out, rows) x (rows, r)
            # product ~5x slower (2.4 GFLOP/s on a fast w1's 1536 x 13k gradient)
            grad_lb = (h.t() @ g2).t().mul_(ctx.scaling).contiguous()
        # d loss / d (x∘m) Aᵀ
        g_pre = (g2 @ lora_b).mul_(ctx.scaling * ctx.keep_scale)
        if need_a:
            grad_a = g_pre.t() @ x2
            if dropped:
                grad_a.index_add_(1, cols, (g_pre[rows] * x2.reshape(-1)[drop].unsqueeze(1)).t(), alpha=-1)
        if need_x:
            grad_x = g2 @ weight
            if dropped:
                base_part = grad_x.reshape(-1)[drop]  # a dropped element gets only the base's gradient
            grad_x.addmm_(g_pre, lora_a)
            if dropped:
                grad_x.reshape(-1)[drop] = base_part
            grad_x = grad_x.view(*grad.shape[:-1], x2.shape[1])
        if need_w:
            grad_w = g2.t() @ x2
        if need_b and ctx.has_bias:
            grad_bias = g2.sum(0)
        sources = len(kept) if ctx.rebuild is not None else 0
        return grad_x, grad_w, grad_bias, grad_a, grad_lb, None, None, None, None, *(None,) * sources


class FusedLoraLinear(LoraLinear):
    """peft's LoRA Linear computed by :class:`_LoraLinearFunction` when it holds only our adapter
    (plain LoRA, not merged, not disabled, one dtype, no autocast, not being compiled); anything
    else takes peft's own forward."""

    def _fusable(self, x: Tensor, args: tuple, kwargs: dict) -> bool:
        base = self.base_layer
        lora_a = self.lora_A[ADAPTER] if ADAPTER in self.lora_A else None
        return (
            not args and not kwargs and not self.disable_adapters and not self.merged
            and list(self.active_adapters) == [ADAPTER] and lora_a is not None
            and ADAPTER not in self.lora_variant and type(base) is nn.Linear
            and (isinstance(lora_a, DroppedLoraA) or isinstance(self.lora_dropout[ADAPTER], nn.Identity))
            and x.dtype == base.weight.dtype == lora_a.weight.dtype == self.lora_B[ADAPTER].weight.dtype
            and not torch.is_autocast_enabled(x.device.type) and not torch.compiler.is_compiling()
        )

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if not self._fusable(x, args, kwargs):
            return super().forward(x, *args, **kwargs)
        return self._fused(x)

    def forward_rebuilt(self, x: Tensor, rebuild: Callable[..., Tensor], *sources: Tensor) -> Tensor:
        """This layer on ``x == rebuild(*sources)``, computed by a caller that keeps ``sources`` for
        its own backward (e.g. an RMSNorm's input): the same value as ``self(x)``, but ``x`` is not
        kept; backward calls ``rebuild(*sources)``, which must give ``x`` again bit for bit."""
        if not self._fusable(x, (), {}):
            return super().forward(x)
        return self._fused(x, rebuild, *sources)

    def _fused(self, x: Tensor, rebuild: Callable[..., Tensor] | None = None, *sources: Tensor) -> Tensor:
        lora_a = self.lora_A[ADAPTER]
        drop, keep_scale = None, 1.0
        if isinstance(lora_a, DroppedLoraA):
            drop = lora_a.drop_index(x)
            if drop is not None:
                keep_scale = lora_a.keep_scale
        return _LoraLinearFunction.apply(x, self.base_layer.weight, self.base_layer.bias, lora_a.weight,
                                         self.lora_B[ADAPTER].weight, drop, keep_scale, self.scaling[ADAPTER],
                                         rebuild, *sources)


def fuse_lora_linears(model: nn.Module) -> None:
    """Give every peft LoRA Linear of ``model`` the fused forward (same module, same parameters)."""
    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = FusedLoraLinear
