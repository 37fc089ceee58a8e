import os
from pathlib import Path

import pytest

REFERENCE = Path(__file__).parent / "fixtures" / "reference"


@pytest.fixture(scope="session")
def reference() -> Path:
    """The golden files made with Fish Speech 1.4.3 (see fixtures/reference/README.md)."""
    return REFERENCE


@pytest.fixture(scope="session", autouse=True)
def _session_hash_cache(tmp_path_factory):
    """Content hashes are memoized in a file of this session (CLI subprocesses inherit it), never
    in the user's ~/.cache; FISHTUNE_HASH_CACHE set outside (e.g. ``off``) is kept."""
    if "FISHTUNE_HASH_CACHE" in os.environ:
        yield
        return
    os.environ["FISHTUNE_HASH_CACHE"] = str(tmp_path_factory.mktemp("hashcache") / "hashes.sqlite")
    yield
    os.environ.pop("FISHTUNE_HASH_CACHE", None)
