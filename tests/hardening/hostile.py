"""Hostile files for tests: a torch checkpoint whose pickle would create a marker file."""

import os
import pickle
import zipfile
from pathlib import Path


class _Touch:
    """Unpickling this calls ``open(marker, "w")``: what an attack would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_marker_pickle(path: Path, marker: Path, zip_format: bool = True) -> Path:
    """A file ``torch.load(weights_only=False)`` would execute; ``weights_only=True`` must refuse."""
    payload = {"state_dict": {"w": _Touch(marker)}}
    if zip_format:
        import torch

        torch.save(payload, path)  # the real torch zip layout, with the object in data.pkl
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    assert not os.path.exists(marker)
    return path
