"""fishtune: the command-line front end of the Fish Speech 1.4 finetuning pipeline.

The models, formats and training code live in ``fish_speech_core``; this package only
turns command-line arguments into calls of those functions (and, for the orchestrated
commands, of the Prefect flows in ``flows``).
"""

import os
from importlib.metadata import PackageNotFoundError, version

# torch's CPU allocator asks for transparent huge pages for blocks of 2 MiB and more; it reads this
# once, at its first allocation, so it is set here, before any fishtune command or flow imports
# torch. With training's fixed mmap threshold (fish_speech_core.allocator) every large activation
# is a fresh mapping: with 4 KiB pages a real-size (mid 2x1024) LoRA step spent 62 CPU-s, with huge
# pages 43, at the same peak RSS (docs/performance.md). A user's own setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

try:
    __version__ = version("fishtune")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
