"""Alembic migrations: from an empty database to head, idempotent, reversible, safe to run concurrently,
and producing exactly the schema of ``alya.db.schema.metadata``; ALYA_AUTO_MIGRATE on a fresh database."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from alya import BatchStatus, JobManager, migrate_database
from alya.core.names import is_rows_partition
from alya.db.migrate import alembic_config
from alya.db.schema import metadata
from alya.db.store import sqlalchemy_url
from tests.support import services
from tests.support.config import make_config
from tests.support.procs import Proc


@pytest.fixture
def empty_db() -> Iterator[str]:
    name = f"alya_m_{uuid.uuid4().hex[:12]}"
    services.admin_exec(f'CREATE DATABASE "{name}"')
    yield f"{services.PG_SERVER}/{name}"
    services.drop_database(name)


def fetch(url: str, query: str) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def catalog(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Everything of the public schema that a migration could get wrong, as PostgreSQL reports it; the
    partitions of batchrows (made by migration 0012 and by maintenance, not declared in the models) apart."""
    parts = {k: [r for r in rows if not is_rows_partition(str(r[0]))] for k, rows in _catalog(url).items()}
    return parts


def _catalog(url: str) -> dict[str, list[tuple[Any, ...]]]:
    return {
        "columns": fetch(url, """
            SELECT table_name, column_name, ordinal_position, data_type, udt_name, character_maximum_length,
                   is_nullable, column_default, is_identity
            FROM information_schema.columns
            WHERE table_schema = 'public' AND table_name <> 'alembic_version' ORDER BY 1, 3"""),
        "constraints": fetch(url, """
            SELECT conrelid::regclass::text, conname, contype, pg_get_constraintdef(oid)
            FROM pg_constraint WHERE connamespace = 'public'::regnamespace
              AND conrelid <> 'alembic_version'::regclass ORDER BY 1, 2"""),
        "indexes": fetch(url, """
            SELECT tablename, indexname, indexdef FROM pg_indexes
            WHERE schemaname = 'public' AND tablename <> 'alembic_version' ORDER BY 1, 2"""),
        "types": fetch(url, """
            SELECT t.typname, array_agg(e.enumlabel ORDER BY e.enumsortorder)
            FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid
            WHERE t.typnamespace = 'public'::regnamespace GROUP BY 1 ORDER BY 1"""),
    }


def version(url: str) -> list[tuple[Any, ...]]:
    return fetch(url, "SELECT version_num FROM alembic_version")


def head() -> str:
    heads = ScriptDirectory.from_config(alembic_config("unused")).get_heads()
    assert len(heads) == 1, f"migrations have several heads: {heads}"
    return heads[0]


def model_diffs(url: str) -> list[Any]:
    engine = create_engine(sqlalchemy_url(url))
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={
                "compare_type": True, "compare_server_default": True,
                "include_name": lambda name, kind, _: not (kind == "table" and is_rows_partition(name or ""))})
            return list(compare_metadata(ctx, metadata))
    finally:
        engine.dispose()


def test_upgrade_from_empty_to_head_equals_the_models(empty_db: str) -> None:
    migrate_database(empty_db)
    assert version(empty_db) == [(head(),)]
    assert {t for (t,) in fetch(empty_db, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            if not is_rows_partition(t)} == {"alembic_version", *metadata.tables}
    # Alembic's comparison: tables, columns, types, nullability, server defaults, indexes, unique/FK keys.
    assert model_diffs(empty_db) == []


def test_migrated_catalog_equals_create_all(empty_db: str) -> None:
    """What autogenerate does not compare (CHECK constraints, partial-index predicates, enum labels,
    identity columns) is compared on PostgreSQL's own catalog against ``metadata.create_all``."""
    migrate_database(empty_db)
    reference = f"alya_ref_{uuid.uuid4().hex[:12]}"
    services.admin_exec(f'CREATE DATABASE "{reference}"')
    try:
        ref_url = f"{services.PG_SERVER}/{reference}"
        engine = create_engine(sqlalchemy_url(ref_url))
        metadata.create_all(engine)
        engine.dispose()
        fetch(ref_url, "CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)")  # filtered out
        migrated, expected = catalog(empty_db), catalog(ref_url)
        for part in expected:
            assert migrated[part] == expected[part], part
        assert any("WHERE (status = 'queued'" in d for _, _, d in migrated["indexes"])  # partial index is there
    finally:
        services.drop_database(reference)


def test_running_it_again_is_a_no_op(empty_db: str) -> None:
    migrate_database(empty_db)
    before = catalog(empty_db), version(empty_db)
    migrate_database(empty_db)
    assert (catalog(empty_db), version(empty_db)) == before


def test_downgrade_to_base_and_up_again(empty_db: str) -> None:
    migrate_database(empty_db)
    migrated = catalog(empty_db)
    command.downgrade(alembic_config(empty_db), "base")
    assert fetch(empty_db, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'") == [("alembic_version",)]
    assert catalog(empty_db)["types"] == []
    assert version(empty_db) == []
    migrate_database(empty_db)
    assert catalog(empty_db) == migrated
    assert model_diffs(empty_db) == []


def test_concurrent_migrations_serialise(empty_db: str) -> None:
    """Several worker processes starting at once: one migrates, the others wait for it (advisory lock)
    and find nothing to do."""
    code = "import sys; from alya import migrate_database; migrate_database(sys.argv[1])"
    procs = [subprocess.Popen([sys.executable, "-c", code, empty_db], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for _ in range(3)]
    outputs = [p.communicate(timeout=180)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert version(empty_db) == [(head(),)]
    assert model_diffs(empty_db) == []


def test_auto_migrate_brings_a_fresh_database_to_head(database_url: str, file_store_url: str) -> None:
    """ALYA_AUTO_MIGRATE: a worker on a database that was never migrated migrates it before its first
    claim (without it, the same call is a DatabaseNotMigrated saying to run `alya migrate`)."""
    import uuid

    import pytest as _pytest

    from alya import DatabaseNotMigrated
    from tests.support import services

    name = f"alya_fresh_{uuid.uuid4().hex[:8]}"
    services.admin_exec(f'CREATE DATABASE "{name}"')
    url = f"{services.PG_SERVER}/{name}"
    try:
        plain = JobManager(database_url=url, object_store_url=file_store_url, config=make_config())
        with _pytest.raises(DatabaseNotMigrated, match="alya migrate"):
            plain.batch_status("00000000-0000-4000-8000-000000000001")
        plain.close()
        jm = JobManager(database_url=url, object_store_url=file_store_url, config=make_config(auto_migrate=True))
        jm.register_batch_processor("logs", "mig", Proc())
        jm.run(stop_when_idle=True)  # migrates, then finds nothing to do
        bid = jm.batch_submit("logs", "mig", {}, [(1, {"x": 1})])
        jm.run(stop_when_idle=True)
        assert jm.batch_status(bid).status is BatchStatus.SUCCESS
        jm.close()
    finally:
        services.drop_database(name)


def test_counters_migration_backfills_the_batches_open_at_upgrade(empty_db: str) -> None:
    """0011_counters: batches open at the upgrade (wait, queued, inprog) get counters equal to their rows;
    final ones read their stored counts and get none; rows moved after the upgrade move the counters."""
    command.upgrade(alembic_config(empty_db), "0008_retention")
    ids = {s: str(uuid.uuid4()) for s in ("wait", "queued", "inprog", "success")}
    for status, bid in ids.items():
        fetch(empty_db, f"INSERT INTO batches (id, app, op, type, context, status, nrows) "
                        f"VALUES ('{bid}', 'm', 'x', 'B', '{{}}', '{status}', 10)")
        fetch(empty_db, f"INSERT INTO batchrows (batch, line, input, status) SELECT '{bid}', i, '{{}}', "
                        f"CASE WHEN '{status}' = 'success' OR i <= 3 THEN 'success' WHEN i <= 5 THEN 'inprog' "
                        f"ELSE 'queued' END::batch_status FROM generate_series(1, 10) i")
    command.upgrade(alembic_config(empty_db), "head")
    counted = fetch(empty_db, "SELECT batch::text, status::text, sum(n)::int FROM batch_counts GROUP BY 1, 2")
    expected = {(ids[s], st, n) for s in ("wait", "queued", "inprog")
                for st, n in (("success", 3), ("inprog", 2), ("queued", 5))}
    assert set(counted) == expected
    fetch(empty_db, f"UPDATE batchrows SET status = 'success' WHERE batch = '{ids['inprog']}' AND status = 'inprog'")
    assert fetch(empty_db, f"SELECT status::text, sum(n)::int FROM batch_counts WHERE batch = '{ids['inprog']}' "
                           f"GROUP BY 1 HAVING sum(n) <> 0 ORDER BY 1") == [("queued", 5), ("success", 5)]
    command.downgrade(alembic_config(empty_db), "0008_retention")
    assert fetch(empty_db, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'alya_counts_%'") == [(0,)]


def test_partitions_migration_on_a_populated_database(empty_db: str, file_store_url: str) -> None:
    """0012_partitions on a database with batches of every state and random (v4) ids: the old table becomes
    the default partition, a row whose old id falls in a new week's range moves there, and afterwards every
    batch is claimable, finishable, readable and purgeable, with its counters exact."""
    from datetime import UTC, datetime, timedelta

    from alya.batch.retention import purge
    from alya.core.ids import uuid7
    from tests.support.procs import drain

    command.upgrade(alembic_config(empty_db), "0011_counters")
    ids = {s: str(uuid.uuid4()) for s in ("wait", "queued", "inprog", "success")}
    in_range = uuid.UUID(uuid7()).int & ~(0xF << 76) | (0x4 << 76)  # an old v4 id that lands in this week
    ids["lucky"] = str(uuid.UUID(int=in_range))
    for kind, bid in ids.items():
        status = "queued" if kind == "lucky" else kind
        fetch(empty_db, f"INSERT INTO batches (id, app, op, type, context, status, nrows, doneat, nsuccess) "
                        f"VALUES ('{bid}', 'm', 'x', 'B', '{{}}', '{status}', 10, "
                        f"{'now()' if kind == 'success' else 'NULL'}, {10 if kind == 'success' else 0})")
        fetch(empty_db, f"INSERT INTO batchrows (batch, line, input, status, doneat) SELECT '{bid}', i, '{{}}', "
                        f"CASE WHEN '{kind}' = 'success' OR ('{kind}' = 'inprog' AND i <= 3) THEN 'success' "
                        f"ELSE 'queued' END::batch_status, CASE WHEN '{kind}' = 'success' THEN now() END "
                        f"FROM generate_series(1, 10) i")
    # what the submits would have counted (inserts count themselves), for the open batches
    fetch(empty_db, "INSERT INTO batch_counts (batch, status, shard, n) SELECT r.batch, r.status, 0, count(*) "
                    "FROM batchrows r JOIN batches b ON b.id = r.batch AND b.status IN ('wait', 'queued', 'inprog') "
                    "GROUP BY 1, 2")
    command.upgrade(alembic_config(empty_db), "head")

    where = dict(fetch(empty_db, "SELECT DISTINCT batch::text, tableoid::regclass::text FROM batchrows"))
    assert {where[ids[k]] for k in ("wait", "queued", "inprog", "success")} == {"batchrows_default"}
    assert where[ids["lucky"]].startswith("batchrows_w")
    assert fetch(empty_db, "SELECT count(*) FROM batchrows") == [(50,)]
    jm = JobManager(database_url=empty_db, object_store_url=file_store_url, config=make_config())
    try:
        jm.register_batch_processor("m", "x", Proc())
        assert jm.batch_status(ids["inprog"]).nsuccess == 3  # counters read through the new parent
        jm.wait_off(ids["wait"])
        drain(jm, "m", "x")
        for kind in ("wait", "queued", "inprog", "lucky"):
            s = jm.batch_status(ids[kind])
            assert (s.status, s.nsuccess) == (BatchStatus.SUCCESS, 10), kind
        assert len(jm.batch_done(ids["success"]).rows) == 10
        new = jm.batch_submit("m", "x", {}, [(1, {"x": 1})])  # a new batch: a UUIDv7 in this week's partition
        assert fetch(empty_db, f"SELECT tableoid::regclass::text FROM batchrows WHERE batch = '{new}'")[0][0] \
            .startswith("batchrows_w")
        fetch(empty_db, "UPDATE batches SET doneat = now() - interval '40 days' WHERE status = 'success'")
        report = purge(jm.services, datetime.now(UTC) - timedelta(days=30))
        assert (report.nbatches, report.nrows) == (5, 50)
        assert fetch(empty_db, "SELECT count(*) FROM batchrows") == [(1,)]
    finally:
        jm.close()
    command.downgrade(alembic_config(empty_db), "0011_counters")  # rows of every partition back in one table
    assert fetch(empty_db, "SELECT count(*) FROM batchrows") == [(1,)]
    assert fetch(empty_db, "SELECT relkind FROM pg_class WHERE relname = 'batchrows'") == [("r",)]
