-- Named queries of the partitions of batchrows (migration 0012; alya.db.partitions, a mixin of Queries).
-- The DDL that names a partition runs in the server-side functions of the migration, so that names are
-- parameters here. Each statement waits at most `ms` for a lock (a local lock_timeout): DDL on
-- batchrows queues every later statement on the table behind it while it waits, so it must give up soon.

-- name: rows_partitions
-- The range partitions of batchrows with their bounds (the default partition is not one), oldest first.
SELECT c.relname, substring(b.bound FROM $r$FROM \('([0-9a-f-]+)'\)$r$), substring(b.bound FROM $r$TO \('([0-9a-f-]+)'\)$r$)
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS bound) b
WHERE i.inhparent = 'batchrows'::regclass AND b.bound <> 'DEFAULT'
ORDER BY 2;

-- name: default_rows
-- Rows of the default partition as the planner estimates them (reltuples: -1 before the first ANALYZE).
SELECT c.reltuples::bigint FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'batchrows'::regclass AND pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT';

-- name: create_rows_partition
SELECT set_config('lock_timeout', %(ms)s::text || 'ms', true);
SELECT alya_partition_create(%(part)s, %(lo)s::uuid, %(hi)s::uuid);

-- name: detach_rows_partition
SELECT set_config('lock_timeout', %(ms)s::text || 'ms', true);
SELECT alya_partition_detach(%(part)s, %(before)s::timestamptz, %(app)s::text);

-- name: discard_rows_partition
SELECT set_config('lock_timeout', %(ms)s::text || 'ms', true);
SELECT alya_partition_discard(%(part)s, %(fk)s);

-- name: detached_rows_partitions
-- Partitions detached by a purge and not yet dropped (it stopped between its transactions).
SELECT relname FROM pg_class
WHERE relkind = 'r' AND NOT relispartition AND relnamespace = current_schema()::regnamespace
  AND relname ~ '^batchrows_w[0-9]{8}$'
ORDER BY relname;
