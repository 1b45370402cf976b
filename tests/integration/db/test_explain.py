"""Query plans of the hot queries on a loaded, analysed database: the named queries of ``sql/queries.sql`` must
walk their indexes, never scan batchrows sequentially (it holds every row of every batch)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest

from alya import BatchInput, JobManager
from alya.core.ids import id_time, uuid7
from alya.core.names import rows_partition
from alya.db import prepared
from alya.db.partitions import period_start
from alya.db.transport import named_sql
from tests.support import services
from tests.support.config import make_config

APP = "explain"
NBATCHES, NROWS = 20, 1000  # 20k rows: enough for the planner to prefer indexes when they fit


@pytest.fixture(scope="module")
def loaded(template_db: str) -> Iterator[dict[str, Any]]:
    name = services.clone_database(template_db)
    url = f"{services.PG_SERVER}/{name}"
    jm = JobManager(database_url=url, redis_url=None, object_store_url="memory://alya-explain",
                    config=make_config())
    ids = [jm.batch_submit(APP, f"op{i % 4}", {}, (BatchInput(n, {"n": n}) for n in range(1, NROWS + 1)))
           for i in range(NBATCHES)]
    jm.close()
    done, half, running = ids[:-2], ids[-2], ids[-1]
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        # Most of the table is history: finished batches, as in production.
        cur.execute("UPDATE batchrows SET status = 'success', doneat = now() WHERE batch = ANY(%s::uuid[])",
                    (done,))
        cur.execute("UPDATE batches SET status = 'success' WHERE id = ANY(%s::uuid[])", (done,))
        cur.execute("UPDATE batchrows SET status = 'success' WHERE batch = %s AND line <= 500", (half,))
        cur.execute("UPDATE batchrows SET status = 'inprog', doneby = 'w' WHERE batch = %s AND line <= 10",
                    (running,))
        cur.execute("UPDATE batches SET status = 'inprog' WHERE id IN (%s, %s)", (half, running))
        # Many batches of many apps, so that batch look-ups have a table worth indexing too.
        cur.execute("""
            INSERT INTO batches (id, app, op, type, context, status, reqat, nrows)
            SELECT gen_random_uuid(), 'app' || (i % 50), 'op' || (i % 7), CASE WHEN i % 5 = 0 THEN 'Q' ELSE 'B' END,
                   '{}', CASE WHEN i % 100 = 0 THEN 'queued' ELSE 'success' END::batch_status,
                   now() - make_interval(hours => i % 2000), 1
            FROM generate_series(1, 20000) AS i""")
        cur.execute("VACUUM ANALYZE batches")
        cur.execute("VACUUM ANALYZE batchrows")
    yield {"url": url, "conn": conn, "half": half, "running": running, "done": done[0]}
    conn.close()
    services.drop_database(name)


def flattened(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """A plan's nodes, depth first."""
    return [plan, *(n for child in plan.get("Plans", []) for n in flattened(child))]


def explain(conn: Any, name: str, cursor: bool = False, **params: Any) -> list[dict[str, Any]]:
    """The plan of a named query (after its SET LOCAL preamble, as it runs), flattened to its nodes.
    ``cursor``: planned as the server-side cursor ``Tx.stream`` declares (which favours fast-start plans)."""
    body = "\n".join(line for line in named_sql()[name].splitlines() if not line.lstrip().startswith("--"))
    statements = [s.strip() for s in body.split(";") if s.strip()]
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            for s in statements[:-1]:
                cur.execute(s, params)
            declare = "DECLARE alya_explain NO SCROLL CURSOR WITHOUT HOLD FOR " if cursor else ""
            cur.execute("EXPLAIN (FORMAT JSON) " + declare + statements[-1], params)
            plan = cur.fetchone()[0][0]["Plan"]
    finally:
        conn.rollback()
        conn.autocommit = True
    return flattened(plan)


def explain_generic(conn: Any, name: str, **params: Any) -> list[dict[str, Any]]:
    """The *generic* plan of a named query, as a prepared statement (``alya.db.prepared``) runs it once
    PostgreSQL stops planning it per call: the parameters unknown, the SET LOCAL preamble applied."""
    parts = prepared.split(name, named_sql()[name])
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            cur.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            for p in parts[:-1]:
                cur.execute(p.text, params)
            last = parts[-1]
            assert last.body is not None
            cur.execute(f"PREPARE alya_explain_generic AS {last.body}")
            args = ", ".join(f"%({n})s" for n in last.params)
            cur.execute(f"EXPLAIN (FORMAT JSON) EXECUTE alya_explain_generic{f'({args})' if args else ''}", params)
            plan = cur.fetchone()[0][0]["Plan"]
    finally:
        conn.rollback()
        conn.autocommit = True
        with conn.cursor() as cur:  # a prepared statement outlives the transaction
            cur.execute("DEALLOCATE ALL")
    return flattened(plan)


def rows_partition_of(batch: str) -> str:
    """The range partition of a UUIDv7 batch id."""
    return rows_partition(period_start(id_time(batch)).strftime("%Y%m%d"))


def role(name: str) -> str:
    """A partition of batchrows (migration 0012) or its index as the parent's: batchrows_w20261130_queued ->
    batchrows_queued, batchrows_default -> batchrows."""
    return re.sub(r"^batchrows_(?:w\d{8}|default)(?=_|$)", "batchrows", name)


def indexes(nodes: list[dict[str, Any]]) -> set[str]:
    return {role(n["Index Name"]) for n in nodes if "Index Name" in n}


def seq_scans(nodes: list[dict[str, Any]]) -> set[str]:
    return {role(n.get("Relation Name", "?")) for n in nodes if n["Node Type"] == "Seq Scan"}


def partitions(nodes: list[dict[str, Any]]) -> set[str]:
    """The partitions of batchrows the plan reads or writes (after plan-time pruning)."""
    return {n["Relation Name"] for n in nodes if n.get("Relation Name", "").startswith("batchrows_")}


def sorts(nodes: list[dict[str, Any]]) -> list[str]:
    return [n["Node Type"] for n in nodes if "Sort" in n["Node Type"]]


def test_claim_rows_walks_the_queued_index_in_line_order(loaded: dict[str, Any]) -> None:
    for after in (0, 700):
        nodes = explain(loaded["conn"], "claim_rows", batch=loaded["half"], n=100, worker="w1", after=after)
        assert "batchrows_queued" in indexes(nodes), nodes
        # pruned at plan time to the batch's week (migration 0012): one partition, whatever their number
        assert partitions(nodes) == {rows_partition_of(loaded["half"])}
        assert "batchrows" not in seq_scans(nodes)
        assert sorts(nodes) == []


def test_claim_rows_on_a_batch_the_statistics_have_never_seen(loaded: dict[str, Any]) -> None:
    jm = JobManager(database_url=loaded["url"], redis_url=None, object_store_url="memory://alya-explain",
                    config=make_config())
    try:
        fresh = jm.batch_submit(APP, "fresh", {}, (BatchInput(n, {}) for n in range(1, 5001)))
    finally:
        jm.close()
    nodes = explain(loaded["conn"], "claim_rows", batch=fresh, n=100, worker="w1", after=0)
    assert "batchrows_queued" in indexes(nodes)
    assert "batchrows" not in seq_scans(nodes)
    assert sorts(nodes) == []


def test_has_open_rows_uses_the_partial_indexes(loaded: dict[str, Any]) -> None:
    for batch in (loaded["half"], loaded["running"], loaded["done"], uuid7()):
        nodes = explain(loaded["conn"], "has_open_rows", id=batch)
        assert {"batchrows_queued", "batchrows_inprog"} <= indexes(nodes), batch
        assert "batchrows" not in seq_scans(nodes)


def test_queued_after_probes_the_queued_index(loaded: dict[str, Any]) -> None:
    for batch in (loaded["half"], uuid7()):
        nodes = explain(loaded["conn"], "queued_after", id=batch, after=10)
        assert "batchrows_queued" in indexes(nodes), batch
        assert "batchrows" not in seq_scans(nodes)


@pytest.mark.parametrize("name", ["row_counts", "batch_rows", "abort_rows", "slowquery_row", "batch_blobrows"])
def test_per_batch_row_queries_use_an_index(loaded: dict[str, Any], name: str) -> None:
    nodes = explain(loaded["conn"], name, id=loaded["half"])
    assert indexes(nodes) & {"batchrows_pkey", "batchrows_queued", "batchrows_inprog"}, nodes
    assert "batchrows" not in seq_scans(nodes)


@pytest.mark.parametrize("name", ["batch_rows", "batch_blobrows"])
def test_streamed_rows_come_in_index_order(loaded: dict[str, Any], name: str) -> None:
    """batch_done and the output files of a million rows stream them through a server-side cursor from
    the primary key, in line order, without collecting and sorting them first."""
    nodes = explain(loaded["conn"], name, cursor=True, id=loaded["half"])
    assert "batchrows_pkey" in indexes(nodes)
    assert sorts(nodes) == [], [(n["Node Type"], n.get("Index Name")) for n in nodes]


@pytest.mark.parametrize("name", ["get_batch", "lock_batch", "lock_open_batch"])
def test_batch_look_ups_use_the_primary_key(loaded: dict[str, Any], name: str) -> None:
    assert indexes(explain(loaded["conn"], name, id=loaded["half"])) == {"batches_pkey"}


def test_open_batches_uses_the_open_index(loaded: dict[str, Any]) -> None:
    nodes = explain(loaded["conn"], "open_batches", app="app3", op="op3", type="B", only=None)
    assert "batches_open" in indexes(nodes)
    assert "batches" not in seq_scans(nodes)


@pytest.mark.parametrize("op", [None, "op3"])
def test_list_batches_uses_the_app_op_reqat_index(loaded: dict[str, Any], op: str | None) -> None:
    nodes = explain(loaded["conn"], "list_batches", app="app3", op=op, type="B", age_days=7)
    assert "batches_app_op_reqat" in indexes(nodes), nodes
    assert "batches" not in seq_scans(nodes)


def test_write_results_probes_the_primary_key_per_line(loaded: dict[str, Any]) -> None:
    """The write-back must reach its rows by the primary key per line (then by tuple id), never by reading
    every row of the batch (that made 200k-row batches 10x slower) nor through the partial index of
    in-progress rows (on `batch` alone, it holds an entry for every row done since the last VACUUM: that
    made each write-back O(rows done so far))."""
    import time

    lines = list(range(1, 11))
    nodes = explain(loaded["conn"], "write_results", batch=loaded["running"], worker="w", lines=lines,
                    attempts=[0] * 10, statuses=["success"] * 10, res=[None] * 10, messages=[None] * 10,
                    blobrows=[None] * 10, delays=[0.0] * 10, finished=[time.time()] * 10)
    scans = [n for n in nodes if role(n.get("Relation Name", "")) == "batchrows" and "Scan" in n["Node Type"]]
    assert scans and "batchrows" not in seq_scans(nodes)
    assert len(partitions(nodes)) == 1, partitions(nodes)  # the look-up and the UPDATE: the batch's partition
    # never a join that reads the whole batch by its `batch` filter (it halved no-op throughput once)
    assert not [n for n in nodes if n["Node Type"] in ("Hash Join", "Merge Join")], nodes
    for n in scans:
        if n["Node Type"] == "Tid Scan":
            continue
        assert role(n.get("Index Name", "")) == "batchrows_pkey" and "line" in n.get("Index Cond", ""), n


@pytest.mark.parametrize("name, params", [("failure_limit", {}), ("requeue_rows", {"status": "failed"}),
                                          ("batch_inputs", {"status": "failed"})])
def test_failed_rows_are_found_through_their_partial_index(loaded: dict[str, Any], name: str,
                                                           params: dict[str, Any]) -> None:
    """The failure threshold's count and a retry's requeue walk batchrows_failed (O(failed rows)), never the
    batch's rows; the inputs of one status are read in line order from an index too."""
    key = "batch" if name == "requeue_rows" else "id"
    nodes = explain(loaded["conn"], name, **{key: loaded["half"]}, **params)
    assert "batchrows" not in seq_scans(nodes)
    if name != "batch_inputs":
        assert "batchrows_failed" in indexes(nodes), nodes
    else:
        assert indexes(nodes) & {"batchrows_failed", "batchrows_pkey"}, nodes


# ---------------------------------------------------------------------------- batch control (issue 20)
@pytest.mark.parametrize(("name", "index", "params"), [
    ("due_deadlines", "batches_deadline", {}),
    ("started_types", "batches_notbefore", {"sec": 3.0}),
    ("unnotified_batches", "batches_unnotified", {"app": "app3", "op": "op3"}),
])
def test_the_schedule_duty_probes_its_partial_indexes(loaded: dict[str, Any], name: str, index: str,
                                                      params: dict[str, Any]) -> None:
    """The maintenance leader runs the first two every second: they must read their partial indexes (open
    batches with a deadline / a not_before), never every batch."""
    nodes = explain(loaded["conn"], name, **params)
    assert index in indexes(nodes), nodes
    assert "batches" not in seq_scans(nodes)


def test_batch_counts_reads_the_counter_rows_of_one_batch(loaded: dict[str, Any]) -> None:
    """An open batch's status reads its counter rows (a range of the primary key), never its rows."""
    nodes = explain(loaded["conn"], "batch_counts", id=loaded["half"])
    assert indexes(nodes) <= {"batch_counts_pkey"} and not seq_scans(nodes) - {"batch_counts"}, nodes
    assert not any(n.get("Relation Name") == "batchrows" for n in nodes)


def test_queue_depths_reads_counters_of_open_batches_only(loaded: dict[str, Any]) -> None:
    """The metrics' queue read walks the open batches and their counters, not the rows (it read every
    queued and in-progress row: 480 ms at 1,000,000) nor every batch ever finished."""
    nodes = explain(loaded["conn"], "queue_depths")
    assert not any(n.get("Relation Name") == "batchrows" for n in nodes)
    assert "batches" not in seq_scans(nodes), nodes


PROBES = {  # existence probes of the claim path, with parameters
    "open_batches": {"app": APP, "op": "op1", "type": "B", "only": None},
    "has_open_rows": {"id": None},
    "queued_after": {"id": None, "after": 10},
    "claimable_batch_types": {},
    "stalled_batches": {"sec": 30.0},
    "unsummarised_batches": {},
}


@pytest.mark.parametrize("name", sorted(PROBES))
def test_existence_probes_never_read_a_whole_index(loaded: dict[str, Any], name: str) -> None:
    """A bitmap scan reads every matching index entry (dead ones too) before its first row: the generic
    plan of the claim's batch list chose one for its EXISTS and read 200,000 entries per claim on a
    200,000-row batch (7.5 ms each, auto_explain). Custom and generic plans alike walk the index instead."""
    params = {k: (loaded["half"] if k == "id" else v) for k, v in PROBES[name].items()}
    for nodes in (explain(loaded["conn"], name, **params), explain_generic(loaded["conn"], name, **params)):
        assert not [n for n in nodes if n["Node Type"].startswith("Bitmap")], [n["Node Type"] for n in nodes]
        if name not in ("claimable_batch_types", "stalled_batches"):  # (those two look at every open batch:
            # over this small table a scan of the rows can be the cheaper plan, and is not a probe's)
            assert rows_partition_of(loaded["half"]) not in {
                n["Relation Name"] for n in nodes if n["Node Type"] == "Seq Scan"}, nodes
