"""Bad inputs through the real CLI (the catalogue in tests/bad_inputs.py): config, data, model
files, paths, export and two-rank runs. Each must exit non-zero within 60 s with an `error:` line
naming the culprit and no traceback. One test runs them all, two at a time, and reports every
failure at once (a test per case would run them one by one)."""

from __future__ import annotations

import pytest

from tests.bad_inputs import CASES, failure_report, run_cases, table


@pytest.mark.slow
# About 2.5 min on 2 busy cores; each case is bounded (60 s, plus its setup), the whole as well.
@pytest.mark.timeout(900)
def test_every_bad_input_ends_in_an_error_line_naming_the_culprit():
    results = run_cases(CASES)
    failed = [r.case.name for r in results if not r.ok]
    assert not failed, (
        f"{len(failed)} of {len(results)} bad inputs were not reported as they must be: "
        f"{failed}\n\n{table(results)}\n\n{failure_report(results)}"
    )
