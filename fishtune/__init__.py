"""fishtune: the command-line front end of the Fish Speech 1.4 finetuning pipeline.

The models, formats and training code live in ``fish_speech_core``; this package only
turns command-line arguments into calls of those functions (and, for the orchestrated
commands, of the Prefect flows in ``flows``).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fishtune")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
