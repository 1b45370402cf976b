"""The batch events hook (alya.core.events) and the Prefect event built from a change (pure logic)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from alya.core import events
from alya.core.events import BatchChange
from alya.core.logs import status_change
from alya.prefect.events import EventSink, event_of


@pytest.fixture
def seen() -> Iterator[list[BatchChange]]:
    got: list[BatchChange] = []
    events.install("test", got.append)
    yield got
    events.uninstall("test")


def test_a_logged_status_change_is_published_once_with_its_counts(seen: list[BatchChange]) -> None:
    status_change("bank", "txn", "b1", "failed", old="inprog", nrows=3, nsuccess=2, nfailed=1, naborted=0,
                  type="B", files=["ledger.csv"], error="too many failures")
    assert seen == [BatchChange("bank", "txn", "b1", "failed", "inprog", "B",
                                {"nrows": 3, "nsuccess": 2, "nfailed": 1, "naborted": 0}, "too many failures")]


def test_a_sink_that_raises_never_fails_the_caller(seen: list[BatchChange]) -> None:
    def broken(change: BatchChange) -> None:
        raise RuntimeError("prefect down")

    events.install("broken", broken)
    try:
        status_change("bank", "txn", "b2", "queued", nrows=1)
    finally:
        events.uninstall("broken")
    assert [c.status for c in seen] == ["queued"]


def test_the_event_names_its_batch_by_resource_and_labels() -> None:
    e = event_of(BatchChange("bank", "txn", "b3", "success", "inprog", "B", {"nrows": 5, "nsuccess": 5}))
    assert e["event"] == "alya.batch.success"
    assert e["resource"] == {"prefect.resource.id": "alya.batch.b3", "prefect.resource.name": "bank-txn-b3",
                             "alya.app": "bank", "alya.op": "txn", "alya.kind": "batch"}
    assert e["payload"] == {"batch_id": "b3", "app": "bank", "op": "txn", "status": "success",
                            "previous": "inprog", "nrows": 5, "nsuccess": 5}


def test_slow_queries_are_left_out_unless_asked() -> None:
    sink = EventSink(slow_queries=False)
    sink(BatchChange("bank", "q", "r1", "queued", type="Q"))  # left out: no thread even started
    assert sink.pending == 0
