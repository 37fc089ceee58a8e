"""Every case of the hostile corpus (tests/hardening/corpus) is handled through the real CLI."""

import pytest

from tests.hardening.corpus import all_cases, run_case

CASES = all_cases()


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[f"{c.family}-{c.name}" for c in CASES])
def test_hostile_case_is_handled(case, tmp_path):
    result = run_case(case, tmp_path)
    assert result.outcome == "handled", result.detail
