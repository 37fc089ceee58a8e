"""One intra-op thread for small CPU work, scoped and restored.

The tiny models (the demo's, the tests') run kernels of a few microseconds. Each OpenMP
parallel region costs more than that, and on a busy machine a whole scheduler slice (~2 ms)
while the second thread waits for a core. Measured on 2 busy cores: tiny LM decode 6.5 -> 45-60
tokens/s, mid (dim 512) 1.0 -> 3.2 tokens/s, tiny codec decode of 64 frames 2-6 s -> 0.3-0.5 s.
Results are unchanged (the same sampled tokens; the generation parity tests pass).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


# A codec up to this size (the tiny preset: 1.3 M) encodes/decodes faster on one CPU thread;
# the released one (47 M) was not measured, so it keeps every thread.
SMALL_MODEL_PARAMETERS = 10_000_000


def small_on_cpu(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether ``model`` is small enough (and on CPU) for :func:`one_thread` to pay."""
    return device.type == "cpu" and sum(p.numel() for p in model.parameters()) <= SMALL_MODEL_PARAMETERS


@contextmanager
def one_thread(enabled: bool) -> Iterator[None]:
    """Run the block on one torch intra-op thread when ``enabled``; restore the count after."""
    before = torch.get_num_threads()
    if not enabled or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
