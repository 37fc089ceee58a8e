"""Build a module's structure on the meta device, without its default weight init.

Every model here is built on ``meta`` and then given its real tensors (a checkpoint's, by
assignment, or our seeded init after ``to_empty``), so the default init torch runs in each
layer's constructor is wasted. On meta it is worse than wasted: ``nn.init.normal_`` (every
``nn.Embedding``) has no C++ meta kernel, and its Python decomposition imports
``torch._dynamo`` and sympy, 1-4 s of CPU on the first model a process builds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode


class _SkipInit(TorchFunctionMode):
    """Make every ``torch.nn.init`` function a no-op (each dispatches through torch-function modes)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs.get("tensor")
        return func(*args, **kwargs)


@contextmanager
def on_meta() -> Iterator[None]:
    """Modules constructed in this block are on the meta device, their weights uninitialised."""
    with torch.device("meta"), _SkipInit():
        yield


def to_empty(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """``model.to_empty(device=device)`` without its ``empty_like`` on meta tensors, which goes
    through a Python reference that imports sympy (~0.5 s); ``torch.empty`` of the shape does not."""
    return model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
