"""Every case of the hostile corpus (tests/hardening/corpus) is handled through the real CLI."""

from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from tests.hardening.corpus import all_cases, run_case

CASES = all_cases()
IDS = [f"{c.family}-{c.name}" for c in CASES]
AT_ONCE = 2  # each case is a CLI process, mostly single-threaded start-up: two keep both cores busy


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    """The selected cases started in test order, two at a time; each test waits for its own."""
    selected = [item.callspec.params["case_id"] for item in request.session.items
                if item.originalname == "test_hostile_case_is_handled" and hasattr(item, "callspec")]
    by_id = dict(zip(IDS, CASES))
    with ThreadPoolExecutor(AT_ONCE) as pool:
        futures: dict[str, Future] = {case_id: pool.submit(run_case, by_id[case_id], tmp_path_factory.mktemp("case"))
                                      for case_id in selected}
        try:
            yield futures
        finally:
            for future in futures.values():
                future.cancel()


@pytest.mark.slow
@pytest.mark.parametrize("case_id", IDS)
def test_hostile_case_is_handled(case_id, outcomes):
    result = outcomes[case_id].result()
    assert result.outcome == "handled", result.detail
