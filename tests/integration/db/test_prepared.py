"""Server-side prepared statements (``alya.db.prepared``) on a real database: every named statement that is
prepared at all prepares (a parameter whose type PostgreSQL cannot settle is found here, not in a worker's
write-back), a connection lost between transactions is prepared again on the next one, and
``ALYA_PREPARED_STATEMENTS=off`` sends plain statements only (PgBouncer in transaction mode)."""

from __future__ import annotations

import psycopg2
import pytest
import structlog.testing

from alya import BatchInput, JobManager, JobManagerConfig
from alya.db.prepared import parts_of
from alya.db.store import Store
from alya.db.transport import named_sql


def _prepared_names(store: Store) -> set[str]:
    """The prepared statements of one pooled connection (the pool hands back the one just used)."""
    with store.tx() as q:
        cur = q._tx.cur  # noqa: SLF001 - the test reads the connection's own view
        cur.execute("SELECT name FROM pg_prepared_statements")
        return {r[0] for r in cur.fetchall()}


def test_every_named_statement_prepares(database_url: str) -> None:
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    failures = []
    try:
        with conn.cursor() as cur:
            for name, sql in named_sql().items():
                for part in parts_of(name, sql):
                    if part.name is None:
                        continue
                    try:
                        cur.execute(f"PREPARE {part.name} AS {part.body}")
                    except psycopg2.Error as exc:
                        failures.append(f"{name}: {str(exc).splitlines()[0]}")
            cur.execute("SELECT count(*) FROM pg_prepared_statements")
            prepared = cur.fetchone()[0]
    finally:
        conn.close()
    assert not failures
    assert prepared > 60  # the hot statements are among them (claims, write-backs, the finish path)


def test_the_engine_path_runs_prepared_and_again_after_a_lost_connection(database_url: str) -> None:
    jm = JobManager(database_url=database_url)
    try:
        first = jm.slowquery_submit("prep", "q", {}, {"a": 1})
        store = jm.services.store
        names = _prepared_names(store)
        assert "alya_insert_query" in names  # a slow query is one statement
        # every pooled connection's backend ends (a server restart, a failover): the next transaction's first
        # statement finds its connection dead, takes a new one and prepares there
        admin = psycopg2.connect(database_url)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        admin.close()
        second = jm.slowquery_submit("prep", "q", {}, {"a": 2})
        assert jm.batch_status(first).status.value == "queued"
        assert jm.batch_status(second).status.value == "queued"
        assert "alya_insert_query" in _prepared_names(store)
    finally:
        jm.close()


def test_off_sends_plain_statements(database_url: str) -> None:
    cfg = JobManagerConfig(prepared_statements=False)  # type: ignore[call-arg]
    jm = JobManager(database_url=database_url, config=cfg)
    try:
        bid = jm.batch_submit("prep", "b", {}, [BatchInput(1, {"x": 1}), BatchInput(2, {"x": 2})])
        assert jm.batch_status(bid).nrows == 2
        assert _prepared_names(jm.services.store) == set()
    finally:
        jm.close()


@pytest.mark.parametrize("prepare", [True, False])
def test_a_statement_means_the_same_prepared_or_not(database_url: str, prepare: bool) -> None:
    """Array, uuid, json and NULL parameters: the casts written out from the prepared types give the same
    rows as the plain statement."""
    store = Store(database_url, prepare=prepare)
    jm = JobManager(database_url=database_url)
    try:
        bid = jm.batch_submit("prep", "b", {"k": "v"}, [BatchInput(i, {"x": i}) for i in range(1, 4)])
        for _ in range(2):  # the second run uses the connection's prepared statement
            with store.tx() as q:
                assert q.batch_context(id=bid) == {"k": "v"}
                rec = q.get_batch(id=bid)
                assert rec is not None and rec.nrows == 3
                assert len(q.open_batches(app="prep", op="b", type="B", only=None)) == 1
                assert len(q.open_batches(app="prep", op="b", type="B", only=bid)) == 1
    finally:
        store.dispose()
        jm.close()


def test_statements_dropped_behind_alyas_back_are_prepared_again(database_url: str) -> None:
    """DEALLOCATE ALL (or DISCARD ALL, or a pooler moving the session) on a pooled connection: the next
    call's statement finds its prepared statement gone; nothing ran, so it is run again, prepared anew."""
    jm = JobManager(database_url=database_url)
    try:
        jm.slowquery_submit("prep", "q", {}, {"a": 1})
        store = jm.services.store
        with store.tx() as q:
            q._tx.cur.execute("DEALLOCATE ALL")  # noqa: SLF001 - behind alya's back, on its pooled connection
        with structlog.testing.capture_logs() as logs:
            req = jm.slowquery_submit("prep", "q", {}, {"a": 2})  # Store.run: the stale attempt is run again
        assert [e["attempt"] for e in logs if e["event"] == "postgres_reconnect"] == [1]
        assert jm.batch_status(req).status.value == "queued"
        assert "alya_insert_query" in _prepared_names(store)
    finally:
        jm.close()
