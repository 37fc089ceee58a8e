from pathlib import Path

import pytest

REFERENCE = Path(__file__).parent / "fixtures" / "reference"


@pytest.fixture(scope="session")
def reference() -> Path:
    """The golden files made with Fish Speech 1.4.3 (see fixtures/reference/README.md)."""
    return REFERENCE
