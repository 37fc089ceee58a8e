"""Test-only: Python imports this at start-up when tests/faults/inject is on PYTHONPATH.

It installs the faults named in ``FISHTUNE_TEST_FAULTS`` (see ``fishtune_faults``) into the
fishtune process a test starts; without that variable it does nothing.
"""

import os

if os.environ.get("FISHTUNE_TEST_FAULTS"):
    import fishtune_faults

    fishtune_faults.install(os.environ["FISHTUNE_TEST_FAULTS"])
