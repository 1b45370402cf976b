"""Batch status changes as Prefect events (issue 20 item 5), read back from a real ``prefect server start``
through its events API (``POST /api/events/filter``), and the README's Automation ("a batch of app bank
failed") created through the API and seen firing.

Events are sent by the process that won each transition: here the client (submit, wait-off, abort) and the
engine (first claim, summary), both in this test process, through ``alya.prefect.events``' sink thread, which
sends with the Prefect settings in force where the sink was installed (``api(url)`` here)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from alya import BatchDetails, BatchJobResult, BatchStatus, ErrorMessage, JobManager
from alya.prefect import events as prefect_events
from tests.support.config import make_config
from tests.support.prefect_server import api, prefect_server, wait_for
from tests.support.procs import drain

APP, OP = "bank", "evt"

# The README's automation, as posted to the API: notify when a batch of app bank fails.
AUTOMATION = {
    "name": "bank batch failed",
    "description": "a batch of app bank ended failed",
    "enabled": True,
    "trigger": {
        "type": "event",
        "posture": "Reactive",
        "match": {"prefect.resource.id": "alya.batch.*", "alya.app": "bank"},
        "expect": ["alya.batch.failed"],
        "threshold": 1,
        "within": 0,
    },
    "actions": [{"type": "do-nothing"}],
}


class Pay:
    def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]) -> BatchJobResult:
        if input["amount"] < 0:
            return BatchJobResult(BatchStatus.FAILED, messages=[ErrorMessage(1, "bad_amount", field="amount")])
        return BatchJobResult(BatchStatus.SUCCESS, {"ok": line})

    def mark_done(self, initblock: Any, context: dict[str, Any], details: BatchDetails) -> None:
        pass


class Query:
    def do_slow_query(self, initblock: Any, context: dict[str, Any], input: dict[str, Any]) -> Any:
        from alya import SlowQueryResult

        return SlowQueryResult(BatchStatus.SUCCESS, {"ok": True})

    def mark_done(self, initblock: Any, context: dict[str, Any], details: BatchDetails) -> None:
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with prefect_server(Path(tmp_path_factory.mktemp("events"))) as url:
        yield url


@pytest.fixture
def ejm(server: str, database_url: str, redis_url: str, file_store_url: str) -> Iterator[JobManager]:
    prefect_events.uninstall()
    with api(server):  # the sink sends with the Prefect settings of the code that installed it
        manager = JobManager(database_url=database_url, redis_url=redis_url, object_store_url=file_store_url,
                             config=make_config(events=True))
    manager.register_batch_processor(APP, OP, Pay())
    manager.register_slowquery_processor(APP, "q", Query())
    yield manager
    manager.close()
    prefect_events.uninstall()


def read_events(url: str, resource_ids: list[str], prefix: str = "alya.batch.") -> list[dict[str, Any]]:
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    body = {"filter": {"occurred": {"since": since}, "event": {"prefix": [prefix]},
                       "any_resource": {"id": resource_ids}, "order": "ASC"}, "limit": 50}
    r = httpx.post(f"{url}/events/filter", json=body, timeout=10)
    assert r.status_code == 200, r.text
    return list(r.json()["events"])


def by_batch(url: str, ids: list[str], expected: dict[str, list[str]], timeout: float = 90) -> dict[str, list[dict]]:
    """Every batch's events, once each batch has the expected names (the server persists them in bulk, a
    few seconds after it receives them)."""
    rids = [f"alya.batch.{b}" for b in ids]

    def check() -> dict[str, list[dict]] | None:
        got: dict[str, list[dict]] = {b: [] for b in ids}
        for e in read_events(url, rids):
            got[e["resource"]["prefect.resource.id"].removeprefix("alya.batch.")].append(e)
        names = {b: sorted(e["event"] for e in evs) for b, evs in got.items()}
        return got if all(names[b] == sorted(expected[b]) for b in ids) else None

    return wait_for("the batches' events", check, timeout, every=1.0)  # type: ignore[no-any-return]


def test_every_status_change_is_one_event_with_labels_and_counts(ejm: JobManager, server: str) -> None:
    r = httpx.post(f"{server}/automations/", json=AUTOMATION, timeout=10)
    assert r.status_code == 201, r.text  # the README's trigger spec is accepted as it is
    automation_id = r.json()["id"]
    time.sleep(2)  # the triggers service loads automations periodically

    good = ejm.batch_submit(APP, OP, {"user": "ann"}, [(i, {"amount": 10}) for i in range(1, 6)])
    bad = ejm.batch_submit(APP, OP, {"user": "ann"}, [(1, {"amount": 5}), (2, {"amount": -1}), (3, {"amount": 7})])
    held = ejm.batch_submit(APP, OP, {}, [(1, {"amount": 1})], wait=True)
    ejm.wait_off(held)
    ejm.batch_abort(held)
    q = ejm.slowquery_submit(APP, "q", {}, {"x": 1})  # slow queries emit nothing by default
    assert drain(ejm, APP, OP) == 8
    assert ejm.batch_status(good).status is BatchStatus.SUCCESS
    assert ejm.batch_status(bad).status is BatchStatus.FAILED

    got = by_batch(server, [good, bad, held], {
        good: ["alya.batch.queued", "alya.batch.inprog", "alya.batch.success"],
        bad: ["alya.batch.queued", "alya.batch.inprog", "alya.batch.failed"],
        held: ["alya.batch.wait", "alya.batch.queued", "alya.batch.aborted"],
    })
    for b, evs in got.items():
        for e in evs:
            res = e["resource"]
            assert res["prefect.resource.id"] == f"alya.batch.{b}"
            assert res["alya.app"] == APP and res["alya.op"] == OP and res["alya.kind"] == "batch"
            assert res["prefect.resource.name"] == f"{APP}-{OP}-{b}"
            assert e["payload"]["batch_id"] == b and e["payload"]["status"] == e["event"].removeprefix("alya.batch.")
    ev = {(b, e["event"].removeprefix("alya.batch.")): e["payload"] for b, evs in got.items() for e in evs}
    assert ev[(good, "queued")]["nrows"] == 5 and ev[(good, "queued")]["previous"] is None
    assert ev[(good, "inprog")].items() >= {"nrows": 5, "previous": "queued"}.items()
    assert ev[(good, "success")].items() >= {"nrows": 5, "nsuccess": 5, "nfailed": 0, "naborted": 0,
                                             "previous": "inprog"}.items()
    assert ev[(bad, "failed")].items() >= {"nrows": 3, "nsuccess": 2, "nfailed": 1, "naborted": 0}.items()
    assert ev[(held, "aborted")].items() >= {"nrows": 1, "naborted": 1, "previous": "queued"}.items()
    assert ev[(held, "queued")]["previous"] == "wait"
    time.sleep(2)  # anything late would be there by now
    assert read_events(server, [f"alya.batch.{q}"]) == []
    assert len(read_events(server, [f"alya.batch.{b}" for b in (good, bad, held)])) == 9  # once per transition

    # The automation fired for the failed batch of app bank (and only it: one firing).
    def fired() -> list[dict[str, Any]]:
        evs = read_events(server, [f"prefect.automation.{automation_id}"], prefix="prefect.automation.")
        return [e for e in evs if e["event"] == "prefect.automation.triggered"]

    firings = wait_for("the automation to fire", fired, 90, every=1.0)
    time.sleep(3)
    firings = fired()
    assert len(firings) == 1
    trigger = firings[0]["payload"].get("triggering_event") or {}
    assert trigger.get("event") == "alya.batch.failed"
    assert trigger.get("resource", {}).get("prefect.resource.id") == f"alya.batch.{bad}"


def test_prefect_unreachable_or_unset_never_blocks(database_url: str, redis_url: str, file_store_url: str) -> None:
    """Prefect unreachable (a closed port): the business calls return at their usual speed; no API URL at
    all: the sink switches itself off instead of starting a temporary Prefect server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.support.prefect_server import free_port

    prefect_events.uninstall()
    with api(f"http://127.0.0.1:{free_port()}/api"):
        jm = JobManager(database_url=database_url, redis_url=redis_url, object_store_url=file_store_url,
                        config=make_config(events=True))
    jm.register_batch_processor(APP, OP, Pay())
    try:
        t0 = time.monotonic()
        ids = [jm.batch_submit(APP, OP, {}, [(1, {"amount": 1})]) for _ in range(5)]
        assert drain(jm, APP, OP) == 5
        took = time.monotonic() - t0
        assert all(jm.batch_status(b).status is BatchStatus.SUCCESS for b in ids)
        assert took < 30, took  # no call waited on Prefect (each event is queued, sent by a thread)
        sink = prefect_events.installed()
        assert sink is not None and not sink.off
        assert sink.flush(60)  # every event tried (and dropped: nothing answers)
        assert sink.failed >= 15 and sink.emitted == 0, (sink.failed, sink.emitted)

        prefect_events.uninstall()
        with temporary_settings(restore_defaults={PREFECT_API_URL}):
            sink = prefect_events.install()  # a fresh sink looks for a Prefect API when its thread starts
        jm.batch_submit(APP, OP, {}, [(1, {"amount": 1})])
        wait_for("the sink to switch off", lambda: sink.off, 30)
    finally:
        jm.close()
        prefect_events.uninstall()


EXIT_SCRIPT = """
import sys
from alya import JobManager
from tests.support.config import make_config

jm = JobManager(database_url=sys.argv[1], config=make_config(events=True))
bid = jm.batch_submit("bank", "evt", {}, [(1, {"amount": 1})])
jm.batch_abort(bid)
print(bid, flush=True)
"""


def test_a_short_lived_process_sends_its_events_before_it_exits(server: str, database_url: str) -> None:
    """A process that submits and aborts, then exits at once (as ``alya abort`` does): its events are
    handed over at exit, not lost with its queue."""
    import os
    import subprocess
    import sys

    from tests.support.prefect_server import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ALYA_"))}
    # With a dispatch, the main thread imports Prefect as the first event starts the sender: the sender's
    # own import of Prefect raced it and Prefect printed "Failed to initialize plugins: deadlock detected"
    # on every `alya submit` (found by following deployments/README.md for an hour).
    env.update(PREFECT_API_URL=server, ALYA_LOG_LEVEL="WARNING", PYTHONPATH=str(REPO), ALYA_DISPATCH="prefect")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, database_url], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "deadlock" not in out.stderr and "Failed to initialize" not in out.stderr, out.stderr[-2000:]
    print(f"\nsubmit + abort + exit: {time.monotonic() - t0:.1f} s")
    bid = out.stdout.strip().splitlines()[-1]
    got = by_batch(server, [bid], {bid: ["alya.batch.queued", "alya.batch.aborted"]})
    (aborted,) = [e for e in got[bid] if e["event"] == "alya.batch.aborted"]
    assert aborted["payload"]["naborted"] == 1 and aborted["resource"]["alya.app"] == "bank"


def test_a_worker_sends_the_events_of_its_transitions(ejm: JobManager, server: str) -> None:
    """``jm.run`` (the worker loop, Prefect flow runs on the server): the first claim and the summary are
    the worker's transitions. An event made inside a run names it as related (a worker's bridge claim loop,
    which may well do all of a small batch, runs outside any run: then none)."""
    bid = ejm.batch_submit(APP, OP, {}, [(i, {"amount": 3}) for i in range(1, 11)])
    with api(server):
        ejm.run(stop_when_idle=True)
    assert ejm.batch_status(bid).status is BatchStatus.SUCCESS
    got = by_batch(server, [bid], {bid: ["alya.batch.queued", "alya.batch.inprog", "alya.batch.success"]})
    done = next(e for e in got[bid] if e["event"] == "alya.batch.success")
    assert done["payload"]["nsuccess"] == 10
    runs = [r for r in done["related"] if r["prefect.resource.role"] == "flow-run"]
    assert len(runs) <= 1 and all(r["prefect.resource.id"].startswith("prefect.flow-run.") for r in runs)
