"""Pure logic of the failure threshold: the value ``max_failures`` takes, the limit record, and a limited
claim's early write-back of a failed row."""

from __future__ import annotations

import time
from typing import Any

import pytest

from alya.batch.outcomes import Outcome
from alya.core.errors import InvalidInput
from alya.core.records import ClaimedRow, FailureLimit
from alya.core.validate import max_failures
from alya.engine.claim import Claimed
from alya.engine.rowpool import Job


@pytest.mark.parametrize("value, expected", [(None, (None, None)), (0, (0, None)), (12, (12, None)),
                                             (0.5, (None, 0.5)), (1e-9, (None, 1e-9))])
def test_accepted(value: Any, expected: Any) -> None:
    assert max_failures(value) == expected


def test_numpy_integers_are_ints() -> None:
    np = pytest.importorskip("numpy")
    assert max_failures(np.int64(3)) == (3, None) and max_failures(np.float64(0.25)) == (None, 0.25)


@pytest.mark.parametrize("value", [True, False, -1, 2**31, 0.0, 1.0, 5.0, -0.1, float("nan"), float("inf"), "3",
                                   [1], {"n": 1}])
def test_refused(value: Any) -> None:
    with pytest.raises(InvalidInput, match="max_failures"):
        max_failures(value)


def test_the_limit_passes_when_more_rows_than_it_failed() -> None:
    assert not FailureLimit(100, 10, 10).passed and FailureLimit(100, 10, 11).passed
    assert FailureLimit(100, 0, 1).passed
    assert FailureLimit(100, 10, 11).error(17) == "too many failures: 17 of 100 rows (limit 10)"


def _outcome(line: int, status: str) -> Outcome:
    return Outcome(line, 1, status, None, None, None, 0.0, time.time())


def test_a_limited_claim_writes_a_failed_row_back_at_once() -> None:
    rows = [ClaimedRow(i, "{}", 1) for i in range(1, 11)]
    plain, limited = Claimed("b", "a", "o", "B", {}, rows, "w"), Claimed("b", "a", "o", "B", {}, rows, "w")
    limited.limited = True
    for c in (plain, limited):
        c.finish(Job(c, rows[0]), _outcome(1, "success"))
    now = time.monotonic()
    assert not plain.flush_due(now, 1.0) and not limited.flush_due(now, 1.0)  # a success waits for the flush
    for c in (plain, limited):
        c.finish(Job(c, rows[1]), _outcome(2, "failed"))
    assert not plain.flush_due(now, 1.0)
    assert limited.flush_due(now, 1.0)
