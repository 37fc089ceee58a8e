"""Package exports resolved on first use, so a light submodule does not drag torch in.

``from fish_speech_core.codec.config import FireflyConfig`` runs ``codec/__init__.py`` first; if
that imported the model and checkpoint modules, reading a config (a JSON-sized dataclass) would
import torch: 3-7 s of a command that never builds a model (the flow's base/codec check).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def exports(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: each name in ``where`` (name -> submodule) is
    imported from its submodule on first access."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{where[name]}"), name)

    return __getattr__
