"""Appending rows to a batch held with wait=True, releasing it (append without wait, wait_off), the row
limit across appends, and every refusal of append and wait_off."""

from __future__ import annotations

from functools import partial
from typing import Any, cast

import pandas as pd

from alya import (
    AlyaError,
    BatchInput,
    BatchNotFound,
    InvalidInput,
    InvalidState,
    JobManager,
)
from tests.support.client import APP, Proc, S, refused, rows, run_chunks, unchanged
from tests.support.config import make_config
from tests.support.services import sql


def test_append_and_release(jm: JobManager, database_url: str) -> None:
    bid = jm.batch_submit(APP, "app", {}, rows(3), wait=True)
    assert jm.batch_append(bid, rows(2, start=4), wait=True) == 5
    assert jm.batch_status(bid).status is S.WAIT
    df = pd.DataFrame({"line": [6, 7], "input": [{"i": 6}, {"i": 7}]})
    assert jm.batch_append(bid, df, wait=True) == 7
    assert jm.batch_append(bid, [(8, '{"i": 8}')]) == 8  # wait=False releases it
    s = jm.batch_status(bid)
    assert (s.status, s.nrows, s.nqueued) == (S.QUEUED, 8, 8)
    assert sql(database_url, "SELECT nrows, status::text FROM batches WHERE id = %s", bid) == [(8, "queued")]
    assert sql(database_url, "SELECT array_agg(line ORDER BY line) FROM batchrows WHERE batch = %s", bid) == [
        (list(range(1, 9)),)]
    # no longer wait: appending is refused and changes nothing
    refused(database_url, InvalidState, lambda: jm.batch_append(bid, rows(1, start=9)), jm=jm, batch_id=bid)


def test_batchrowmax_enforced_on_submit_and_across_appends(database_url: str, redis_url: str,
                                                           file_store_url: str) -> None:
    jm = JobManager(database_url=database_url, redis_url=redis_url, object_store_url=file_store_url,
                    config=make_config(batchrowmax=5))
    try:
        refused(database_url, InvalidInput, lambda: jm.batch_submit(APP, "op", {}, rows(6)))
        bid = jm.batch_submit(APP, "op", {}, rows(3), wait=True)
        refused(database_url, InvalidInput, lambda: jm.batch_append(bid, rows(3, start=4)), jm=jm, batch_id=bid)
        assert jm.batch_append(bid, rows(2, start=4), wait=True) == 5
        refused(database_url, InvalidInput, lambda: jm.batch_append(bid, rows(1, start=6)), jm=jm, batch_id=bid)
        assert jm.wait_off(bid) == 5
        assert jm.batch_submit(APP, "op", {}, rows(5))
    finally:
        jm.close()


def test_append_refusals(jm: JobManager, database_url: str) -> None:
    bid = jm.batch_submit(APP, "app", {}, rows(3), wait=True)
    cases: list[tuple[Any, type[AlyaError]]] = [
        (rows(1, start=2), InvalidInput),                       # line already in the batch
        ([], InvalidInput),                                     # nothing to append
        ([BatchInput(9, cast(Any, [1]))], InvalidInput),        # input not an object
        ([BatchInput(0, {})], InvalidInput),                    # line out of range
    ]
    for bad, exc in cases:
        refused(database_url, exc, partial(jm.batch_append, bid, bad), jm=jm, batch_id=bid)
    refused(database_url, BatchNotFound, lambda: jm.batch_append("00000000-0000-0000-0000-000000000000", rows(1)))
    refused(database_url, BatchNotFound, lambda: jm.batch_append("nope", rows(1)))
    qid = jm.slowquery_submit(APP, "q", {}, {})
    refused(database_url, InvalidState, lambda: jm.batch_append(qid, rows(1)), jm=jm, batch_id=qid)
    assert jm.batch_status(bid).nrows == 3


def test_wait_off(jm: JobManager, database_url: str) -> None:
    jm.register_batch_processor(APP, "wo", Proc())
    bid = jm.batch_submit(APP, "wo", {}, rows(250), wait=True)
    assert jm.wait_off(bid) == 250
    assert jm.batch_status(bid).status is S.QUEUED
    with unchanged(database_url, jm, bid):
        assert jm.wait_off(bid) == 250  # queued: no-op
    jm.engine.process_chunk(APP, "wo")  # one chunk of 100: the batch is now inprog
    assert sql(database_url, "SELECT status::text FROM batches WHERE id = %s", bid) == [("inprog",)]
    refused(database_url, InvalidState, lambda: jm.wait_off(bid))
    run_chunks(jm, APP, "wo")
    assert jm.batch_status(bid).status is S.SUCCESS
    refused(database_url, InvalidState, lambda: jm.wait_off(bid))
    aborted = jm.batch_submit(APP, "wo2", {}, rows(1), wait=True)
    jm.batch_abort(aborted)
    refused(database_url, InvalidState, lambda: jm.wait_off(aborted))
    refused(database_url, BatchNotFound, lambda: jm.wait_off("8d3e4a0c-0000-4000-8000-000000000000"))
    refused(database_url, BatchNotFound, lambda: jm.wait_off("not-a-uuid"))
