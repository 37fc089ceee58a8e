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

from fish_speech_core.finetune.lora import ADAPTER

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


class SampleDropout(nn.Module):
    """Inverted dropout with the masks of :class:`DropoutContext`; plain dropout without one set."""

    def __init__(self, p: float, layer: int, stack: str, context: DropoutContext) -> None:
        super().__init__()
        self.p = p
        self.layer = layer
        self.stack = stack
        self.context = context

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.context.uids is None:  # outside the finetune loop (benchmarks, ad-hoc use)
            return F.dropout(x, self.p, training=True)
        keep = self.context.keep_mask(x.shape, x.device, self.p, self.layer, self.stack)
        # where() keeps only the bool mask for backward
        return torch.where(keep, x * (1.0 / (1.0 - self.p)), torch.zeros((), dtype=x.dtype, device=x.device))

    def extra_repr(self) -> str:
        return f"p={self.p}, layer={self.layer}, stack={self.stack}"


def use_sample_dropout(model: nn.Module, seed: int) -> DropoutContext:
    """Replace the dropout of every LoRA Linear of ``model`` by :class:`SampleDropout`; return
    the context the training step fills. Layers are numbered in module order; ``fast_*`` modules
    belong to the fast transformer."""
    from peft.tuners.lora import LoraLayer

    context = DropoutContext(seed)
    layer = 0
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or ADAPTER not in module.lora_dropout:
            continue
        current = module.lora_dropout[ADAPTER]
        if isinstance(current, nn.Dropout) and current.p > 0:
            stack = FAST if name.split(".", 1)[0].startswith("fast_") else SLOW
            module.lora_dropout[ADAPTER] = SampleDropout(current.p, layer, stack, context)
        layer += 1
    return context
