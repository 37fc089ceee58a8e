"""LoRA dropout keyed by sample, so a run's masks do not depend on how its batch is split.

peft's LoRA layers draw their dropout masks from the global generator over the whole local
batch: the mask a sample gets then depends on its rank, its place in the batch and the padded
length. Here each sample's masks come from a generator seeded by (seed, the sample's number in
the training stream, the layer), drawn over the sample's own rows only, so one global batch gets
the same masks split over 1 or N processes, and a resumed run the same masks as an uninterrupted
one. Rows are what a layer sees per sample: the slow layers ``(B, T, in)`` take the first
``length`` positions of sample b; the fast layers ``(N, K, in)`` take sample b's block of fast
rows (:meth:`~fish_speech_core.lm.model.DualARTransformer.fast_rows`, b-major), each ``(K, in)``.
Padding rows keep everything (their outputs reach no loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ADAPTER = "default"  # peft's adapter name (fish_speech_core.finetune.lora uses this one)

SLOW, FAST = "slow", "fast"


@dataclass
class DropoutContext:
    """The current training forward's samples: set by the training step before the forward.

    ``uids`` (B,) stream numbers, ``lengths`` (B,) unpadded positions, ``fast_counts`` (B,) fast
    rows per sample; all on the CPU (they size the draws).
    """

    seed: int
    uids: list[int] | None = None
    lengths: list[int] = field(default_factory=list)
    fast_counts: list[int] = field(default_factory=list)
    _generators: dict = field(default_factory=dict)

    def set(self, uids: Tensor, lengths: Tensor, fast_counts: Tensor) -> None:
        self.uids = [int(u) for u in uids.tolist()]
        self.lengths = [int(n) for n in lengths.tolist()]
        self.fast_counts = [int(n) for n in fast_counts.tolist()]
        if any(u < 0 for u in self.uids):
            raise ValueError("every training sample needs its stream number (uid) for its dropout masks")

    def generator(self, device: torch.device, uid: int, layer: int) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        gen.manual_seed(((self.seed * 1_000_003 + uid) * 10_007 + layer) % 2**63)
        return gen

    def keep_mask(self, shape: torch.Size, device: torch.device, p: float, layer: int, stack: str) -> Tensor:
        """Bool ``shape`` mask, True = kept, for a ``stack`` layer's input of this forward."""
        rows, *inner = shape
        if stack == SLOW:
            if rows != len(self.uids):
                raise ValueError(f"slow-layer input has {rows} samples, the dropout context {len(self.uids)}")
            keep = torch.ones(shape, dtype=torch.bool, device=device)
            for b, (uid, length) in enumerate(zip(self.uids, self.lengths)):
                n = min(length, inner[0])
                draw = torch.rand((n, *inner[1:]), generator=self.generator(device, uid, layer), device=device)
                keep[b, :n] = draw >= p
            return keep
        if rows != sum(self.fast_counts):
            raise ValueError(f"fast-layer input has {rows} rows, the dropout context {sum(self.fast_counts)}")
        blocks = [torch.rand((n, *inner), generator=self.generator(device, uid, layer), device=device) >= p
                  for uid, n in zip(self.uids, self.fast_counts)]
        return torch.cat(blocks) if blocks else torch.ones(shape, dtype=torch.bool, device=device)


class _DroppedProjection(torch.autograd.Function):
    """``h = (x * keep / (1 - p)) Aᵀ`` that saves ``x`` and the bool mask for backward, not the
    dropped fp32 copy of ``x``: with a separate dropout every adapted layer kept one more copy of
    its input (the fast layers' inputs are 8 positions per frame, so these copies were ~1.5 GB of
    a mid-size 2x1024 step). ``x`` is often saved anyway (wqkv/w1/w3 and w1/w3 share one input)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(x, weight, keep)
        ctx.scale = scale
        return F.linear(torch.where(keep, x * scale, torch.zeros((), dtype=x.dtype, device=x.device)), weight)

    @staticmethod
    def backward(ctx, grad_h: Tensor):
        x, weight, keep = ctx.saved_tensors
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.where(keep, (grad_h @ weight) * ctx.scale, zero)
        if ctx.needs_input_grad[1]:
            dropped = torch.where(keep, x * ctx.scale, zero)  # (..., in), rebuilt only for this product
            grad_w = grad_h.reshape(-1, grad_h.size(-1)).t() @ dropped.reshape(-1, x.size(-1))
        return grad_x, grad_w, None, None


class DroppedLoraA(nn.Module):
    """peft's ``lora_A`` Linear with the adapter's input dropout folded in (peft's own dropout
    is then an Identity). Masks come from :class:`DropoutContext` once the finetune loop sets one,
    else fresh from the global generator. Holds the same ``weight`` parameter, so state-dict
    names, merge and the optimizer see no difference."""

    def __init__(self, weight: nn.Parameter, p: float, layer: int = 0, stack: str = SLOW,
                 context: DropoutContext | None = None) -> None:
        super().__init__()
        self.weight = weight
        self.p = p
        self.layer = layer
        self.stack = stack
        self.context = context

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return F.linear(x, self.weight)
        if self.context is None or self.context.uids is None:  # outside the finetune loop (benchmarks)
            keep = torch.rand(x.shape, device=x.device) >= self.p
        else:
            keep = self.context.keep_mask(x.shape, x.device, self.p, self.layer, self.stack)
        return _DroppedProjection.apply(x, self.weight, keep, 1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"in={self.weight.size(1)}, r={self.weight.size(0)}, p={self.p}, layer={self.layer}, stack={self.stack}"


def fold_lora_dropout(model: nn.Module) -> None:
    """Move the input dropout of every LoRA Linear of ``model`` into its ``lora_A``
    (:class:`DroppedLoraA`); same masks and values, a bool mask instead of a dropped copy saved."""
    from peft.tuners.lora import Linear as LoraLinear

    for module in model.modules():
        if not isinstance(module, LoraLinear) or ADAPTER not in module.lora_dropout:
            continue
        current = module.lora_dropout[ADAPTER]
        if isinstance(current, nn.Dropout) and current.p > 0:
            module.lora_A[ADAPTER] = DroppedLoraA(module.lora_A[ADAPTER].weight, current.p)
            module.lora_dropout[ADAPTER] = nn.Identity()


def use_sample_dropout(model: nn.Module, seed: int) -> DropoutContext:
    """Key the dropout masks of every LoRA Linear of ``model`` (folded by :func:`fold_lora_dropout`,
    which :func:`~fish_speech_core.finetune.lora.add_lora` calls) by sample; return the context the
    training step fills. Layers are numbered in module order; ``fast_*`` modules belong to the
    fast transformer."""
    from peft.tuners.lora import LoraLayer

    fold_lora_dropout(model)  # a no-op for add_lora's models
    context = DropoutContext(seed)
    layer = 0
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or ADAPTER not in module.lora_dropout:
            continue
        lora_a = module.lora_A[ADAPTER] if ADAPTER in module.lora_A else None
        if isinstance(lora_a, DroppedLoraA):
            lora_a.layer = layer
            lora_a.stack = FAST if name.split(".", 1)[0].startswith("fast_") else SLOW
            lora_a.context = context
        layer += 1
    return context
