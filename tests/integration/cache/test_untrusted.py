"""Redis is not trusted (issue 18): whoever reaches it may write anything under a batch's keys. A value
that does not parse or check is a miss that PostgreSQL answers and overwrites; a forged value with a high
version no longer blocks real writes; the done-rows entry is versioned like the summary. On the real
Redis and PostgreSQL."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import redis

from alya import BatchInput, BatchJobResult, BatchStatus, JobManager
from alya.core.names import done_key, summary_key

APP = "untrusted"
S = BatchStatus


class Ok:
    def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]
                     ) -> BatchJobResult:
        return BatchJobResult(S.SUCCESS, result={"line": line})

    def mark_done(self, initblock: Any, context: dict[str, Any], details: Any) -> None:
        pass


def real(**over: Any) -> dict[str, Any]:
    """A well-formed cached summary of a queued 2-row batch, with fields replaced."""
    return {"status": "queued", "outputfiles": {}, "nrows": 2, "nsuccess": 0, "nfailed": 0, "naborted": 0,
            "nqueued": 2, "ninprog": 0, "error": None, "ver": 2, "final": False, **over}


FORGED = [
    b"not json", b"[1, 2]", orjson.dumps(real(ver=1e9)), orjson.dumps(real(status="bogus")),
    orjson.dumps(real(ver="7")), orjson.dumps(real(ver=True)), orjson.dumps(real(ver=2**40)),
    orjson.dumps(real(final=True)),  # final, with an open status
    orjson.dumps(real(nqueued=-1)), orjson.dumps(real(nqueued=5)), orjson.dumps(real(nrows="2")),
    orjson.dumps(real(outputfiles=["x"])), orjson.dumps(real(outputfiles={"a": 1})),
    orjson.dumps(real(error={"x": 1})), orjson.dumps({k: v for k, v in real().items() if k != "nrows"}),
]


@pytest.mark.parametrize("raw", FORGED)
def test_a_garbled_or_forged_summary_is_a_miss_answered_by_postgresql(jm: JobManager, redis_url: str,
                                                                      raw: bytes) -> None:
    """``{"ver": 1e9}`` and ``{"status": "bogus"}`` raised KeyError / ValueError from batch_status."""
    bid = jm.batch_submit(APP, "op", {}, [BatchInput(1, {}), BatchInput(2, {})])
    r = redis.Redis.from_url(redis_url)
    r.set(summary_key(bid), raw, ex=60)
    s = jm.batch_status(bid)
    assert (s.status, s.nrows, s.nqueued) == (S.QUEUED, 2, 2)
    assert orjson.loads(r.get(summary_key(bid)) or b"null")["nrows"] == 2  # overwritten with PostgreSQL's


def test_a_forged_final_summary_with_a_high_version_yields_to_a_real_abort(jm: JobManager, redis_url: str) -> None:
    """The probe of issue 18: a forged `success` at version 10**9 blocked every real write, so it was served
    even after the batch was aborted. The abort's refused write now finds it newer than PostgreSQL's
    version, deletes it and writes the truth."""
    bid = jm.batch_submit(APP, "op", {}, [BatchInput(1, {}), BatchInput(2, {})])
    r = redis.Redis.from_url(redis_url)
    r.set(summary_key(bid), orjson.dumps(real(status="success", final=True, nsuccess=2, nqueued=0, ver=10**9)))
    assert jm.batch_status(bid).status is S.SUCCESS  # well-formed: indistinguishable until a write meets it
    assert jm.batch_abort(bid).status is S.ABORTED
    assert jm.batch_status(bid).status is S.ABORTED and jm.batch_done(bid).naborted == 2
    assert orjson.loads(r.get(summary_key(bid)) or b"null")["status"] == "aborted"


def test_the_done_rows_entry_is_versioned_like_the_summary(jm: JobManager, redis_url: str) -> None:
    """A done entry of another version, another row count or garbled rows is a miss: the rows come from
    PostgreSQL and replace it."""
    jm.register_batch_processor(APP, "op", Ok())
    bid = jm.batch_submit(APP, "op", {}, [BatchInput(1, {}), BatchInput(2, {})])
    jm.run(stop_when_idle=True)
    truth = jm.batch_done(bid)
    assert truth.status is S.SUCCESS and [r.res for r in truth.rows or []] == [{"line": 1}, {"line": 2}]
    r = redis.Redis.from_url(redis_url)
    ver = orjson.loads(r.get(summary_key(bid)) or b"null")["ver"]
    forged_rows = [[1, "success", {"line": "forged"}, None], [2, "success", {"line": "forged"}, None]]
    for forged in ({"rows": forged_rows, "ver": ver - 1, "final": True},            # another version
                   {"rows": forged_rows[:1], "ver": ver, "final": True},           # another row count
                   {"rows": [[1, "bogus", None, None], [2]], "ver": ver, "final": True},
                   {"rows": forged_rows, "ver": 10**9, "final": True},             # blocks writes: replaced
                   {"rows": "x", "ver": ver, "final": True}):
        r.set(done_key(bid), orjson.dumps(forged))
        assert jm.batch_done(bid) == truth, forged
        assert orjson.loads(r.get(done_key(bid)) or b"null")["ver"] == ver
