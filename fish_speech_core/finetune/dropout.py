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

import math
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

    def drop_index(self, shape: torch.Size, device: torch.device, p: float, layer: int, stack: str) -> Tensor:
        """Sorted flat indices (into the input viewed as 1-D) of the elements a ``stack`` layer's
        input of this forward drops; each element independently with probability ``p``."""
        rows, *inner = shape
        width = math.prod(inner)  # elements per row
        if stack == SLOW:
            if rows != len(self.uids):
                raise ValueError(f"slow-layer input has {rows} samples, the dropout context {len(self.uids)}")
            per_position = math.prod(inner[1:])
            blocks = [(b * width, min(length, inner[0]) * per_position) for b, length in enumerate(self.lengths)]
        else:
            if rows != sum(self.fast_counts):
                raise ValueError(f"fast-layer input has {rows} rows, the dropout context {sum(self.fast_counts)}")
            starts = [0]
            for n in self.fast_counts[:-1]:
                starts.append(starts[-1] + n)
            blocks = [(start * width, n * width) for start, n in zip(starts, self.fast_counts)]
        drawn = [offset + dropped_positions(count, p, self.generator(device, uid, layer), device)
                 for uid, (offset, count) in zip(self.uids, blocks)]
        return torch.cat(drawn) if drawn else torch.empty(0, dtype=torch.long, device=device)


def dropped_positions(count: int, p: float, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Sorted positions in ``[0, count)``, each one present independently with probability ``p``.

    Drawn as the gaps of a Bernoulli process (geometric, >= 1), about ``count * p`` numbers
    instead of ``count`` uniforms and a full-size mask: at p = 0.01 a fast layer's w2 input
    (13k rows x 1536) costs ~200k draws, 13x less time than the dense mask, and the dropped
    set is all that backward keeps."""
    if count <= 0 or p <= 0.0:
        return torch.empty(0, dtype=torch.long, device=device)
    mean = count * p
    chunk = int(mean + 6.0 * math.sqrt(mean) + 16)  # almost always one draw is enough
    parts, last = [], -1.0
    while True:
        gaps = torch.empty(chunk, dtype=torch.float64, device=device).geometric_(p, generator=generator)
        positions = gaps.cumsum(0).add_(last)
        inside = positions < count
        parts.append(positions[inside])
        if not bool(inside[-1]):
            break
        last = float(positions[-1])
    return torch.cat(parts).long()


class DroppedLoraA(nn.Module):
    """peft's ``lora_A`` Linear with the adapter's input dropout folded in (peft's own dropout
    is then an Identity). :class:`~fish_speech_core.finetune.lora_linear.FusedLoraLinear`
    computes the whole adapted layer from :meth:`drop_index`; calling this module on its own
    (tests, an unfused layer) gives the same values with a dense mask. Masks come from
    :class:`DropoutContext` once the finetune loop sets one, else from the global generator.
    Holds the same ``weight`` parameter, so state-dict names, merge and the optimizer see no
    difference."""

    def __init__(self, weight: nn.Parameter, p: float, layer: int = 0, stack: str = SLOW,
                 context: DropoutContext | None = None) -> None:
        super().__init__()
        self.weight = weight
        self.p = p
        self.layer = layer
        self.stack = stack
        self.context = context

    @property
    def keep_scale(self) -> float:
        return 1.0 / (1.0 - self.p)

    def drop_index(self, x: Tensor) -> Tensor | None:
        """Flat indices of the elements of ``x`` dropped in this forward; None when nothing drops."""
        if not self.training or self.p == 0.0:
            return None
        if self.context is None or self.context.uids is None:  # outside the finetune loop (benchmarks)
            return dropped_positions(x.numel(), self.p, None, x.device)
        return self.context.drop_index(x.shape, x.device, self.p, self.layer, self.stack)

    def forward(self, x: Tensor) -> Tensor:
        drop = self.drop_index(x)
        if drop is None:
            return F.linear(x, self.weight)
        keep = torch.ones(x.numel(), dtype=x.dtype, device=x.device)
        keep[drop] = 0.0
        return F.linear(x * keep.view(x.shape) * self.keep_scale, self.weight)

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
