"""fishtune's processes give torch's large CPU blocks transparent huge pages (fishtune/__init__.py)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import re
import fishtune, torch
block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, every page touched
rollup = open('/proc/self/smaps_rollup').read()
print(int(re.search(r'AnonHugePages:\\s+(\\d+)', rollup).group(1)))
"""
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _huge_kib(extra_env: dict[str, str]) -> int:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | extra_env
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not THP.is_file() or not re.search(r"\[(always|madvise)\]", THP.read_text()),
                    reason="the kernel gives no transparent huge pages on request")
def test_a_large_tensor_gets_huge_pages_unless_the_user_says_no():
    assert _huge_kib({}) >= 32 << 10  # most of the 64 MiB block sits in 2 MiB pages
    assert _huge_kib({"THP_MEM_ALLOC_ENABLE": "0"}) == 0  # the user's setting wins
