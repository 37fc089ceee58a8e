"""Import check run right after an install: one line per broken package, never a traceback.

``python -m fishtune.setup_check`` imports what fishtune cannot run without, including the compiled
parts that fail only when loaded (torchaudio's extension must match the installed torch). Each
failure is one line naming the package, its version, the first line of the error and the fix.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

# (distribution, modules to import). torchaudio._extension loads libtorchaudio: the part that breaks
# when torchaudio was built for another torch (torchaudio 2.11.1 beside torch 2.11.0).
REQUIRED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("torch", ("torch",)),
    ("torchaudio", ("torchaudio", "torchaudio._extension")),
    ("prefect", ("prefect", "prefect.flows")),
    ("lightning", ("lightning",)),
    ("peft", ("peft",)),
    ("soundfile", ("soundfile",)),
    ("pyloudnorm", ("pyloudnorm",)),
    ("tokenizers", ("tokenizers",)),
    ("pyarrow", ("pyarrow", "pyarrow.parquet")),
    ("s3fs", ("s3fs",)),
)
# What `fishtune doctor` re-checks on every run: the compiled parts that break on a mismatched install,
# without lightning and peft (10 s of imports each here; the install-time check covers them).
QUICK: tuple[tuple[str, tuple[str, ...]], ...] = tuple(r for r in REQUIRED if r[0] not in ("lightning", "peft"))
FIX = "reinstall from the lock: `make clean-venv && make test` (or `uv sync --locked --extra test`)"


@dataclass(frozen=True)
class Broken:
    distribution: str
    version: str
    error: str

    def line(self) -> str:
        return f"fishtune setup: {self.distribution} {self.version} does not import ({self.error}); {FIX}"


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "(not installed)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    detail = text[0] if text else ""
    return f"{type(exc).__name__}: {detail[:200]}" if detail else type(exc).__name__


Required = tuple[tuple[str, tuple[str, ...]], ...]


def check(required: Required | None = None) -> list[Broken]:
    """Every required distribution that fails to import, with the first line of its error."""
    broken = []
    for distribution, modules in REQUIRED if required is None else required:
        for module in modules:
            try:
                importlib.import_module(module)
            except BaseException as exc:  # noqa: BLE001 - an OSError from a .so is as broken as an ImportError
                if isinstance(exc, KeyboardInterrupt):
                    raise
                broken.append(Broken(distribution, _version(distribution), _first_line(exc)))
                break
    return broken


def main(required: Required | None = None) -> int:
    broken = check(required)
    for item in broken:
        print(item.line(), file=sys.stderr)
    if not broken:
        print(f"fishtune setup: ok (torch {_version('torch')}, torchaudio {_version('torchaudio')}, "
              f"prefect {_version('prefect')}, lightning {_version('lightning')}, peft {_version('peft')})")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
