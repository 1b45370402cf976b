"""``batch_submit``'s ``not_before`` and ``deadline`` (issue 20, item 4): what is refused, before anything is
stored. Pure logic."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from alya.core import validate
from alya.core.errors import InvalidInput
from alya.core.names import PAUSE_PREFIX, RESUME_PREFIX, pause_payload, resume_payload, work_payload

NOW = datetime.now(UTC)


def test_aware_datetimes_pass_unchanged() -> None:
    nb, dl = NOW + timedelta(hours=1), (NOW + timedelta(hours=2)).astimezone(timezone(timedelta(hours=-7)))
    assert validate.schedule(nb, dl) == (nb, dl)
    assert validate.schedule(None, None) == (None, None)
    assert validate.schedule(NOW - timedelta(days=3), None)[0] is not None  # a start in the past: now


@pytest.mark.parametrize(("not_before", "deadline", "says"), [
    (datetime(2030, 1, 1), None, "without a time zone"),
    (None, datetime(2030, 1, 1), "without a time zone"),
    ("2030-01-01T00:00:00Z", None, "str"),
    (date(2030, 1, 1), None, "date"),
    (1_900_000_000, None, "int"),
    (None, NOW - timedelta(seconds=1), "already passed"),
    (NOW + timedelta(hours=2), NOW + timedelta(hours=1), "must be after not_before"),
    (NOW + timedelta(hours=1), NOW + timedelta(hours=1), "must be after not_before"),
])
def test_refused(not_before: object, deadline: object, says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        validate.schedule(not_before, deadline)


def test_pause_notices_are_not_work() -> None:
    """The waker tells notices about one batch from work payloads (app/op) by their prefixes."""
    bid = "00000000-0000-4000-8000-000000000001"
    assert pause_payload(bid) == PAUSE_PREFIX + bid and resume_payload(bid) == RESUME_PREFIX + bid
    assert not work_payload("app", "op").startswith((PAUSE_PREFIX, RESUME_PREFIX))
