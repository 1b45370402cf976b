-- All of alya's SQL, run by name through alya.db.store. psycopg2 parameters: %(name)s.
-- {batch_columns} is alya.core.records.BatchRecord.COLUMNS, the one list of a batch record's columns.
-- Hot paths (claim, write_results) are one statement per chunk, never one per row.

-- name: insert_batch
INSERT INTO batches (id, app, op, type, context, inputfile, status, nrows, priority)
VALUES (%(id)s, %(app)s, %(op)s, %(type)s, %(context)s::jsonb, %(inputfile)s, %(status)s, 0, %(priority)s);

-- name: insert_batch_keyed
-- insert_batch with the client's idempotency key. A batch of this app already holding the key (or one
-- being inserted by a concurrent call: the unique index makes this statement wait for that transaction)
-- means this is a retry: nothing is inserted and no row returned.
INSERT INTO batches (id, app, op, type, context, inputfile, status, nrows, idempotency_key, priority)
VALUES (%(id)s, %(app)s, %(op)s, %(type)s, %(context)s::jsonb, %(inputfile)s, %(status)s, 0, %(key)s, %(priority)s)
ON CONFLICT (app, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id;

-- name: batch_by_key
SELECT id, op, type FROM batches WHERE app = %(app)s AND idempotency_key = %(key)s;

-- name: keyed_call_matches
-- Whether a retry with the key of batch %(id)s is the same call (Stripe's rule): the same op, type,
-- context (as jsonb: key order and spacing do not matter), input file and, for a slow query, input.
SELECT b.op = %(op)s AND b.type = %(type)s AND b.context = %(context)s::jsonb
       AND b.inputfile IS NOT DISTINCT FROM %(inputfile)s
       AND (%(input)s::jsonb IS NULL
            OR EXISTS (SELECT 1 FROM batchrows r WHERE r.batch = %(id)s AND r.line = 0 AND r.input = %(input)s::jsonb))
FROM batches b WHERE b.id = %(id)s;

-- name: get_batch
SELECT {batch_columns}
FROM batches WHERE id = %(id)s;

-- name: lock_batch
SELECT {batch_columns}
FROM batches WHERE id = %(id)s FOR UPDATE;

-- name: set_nrows_status
-- After rows were copied in: the new total, and `queued` unless the caller holds the batch in `wait`.
-- The version moves on every append too, so a reader's stale nrows cannot replace the new one in Redis.
UPDATE batches SET nrows = %(nrows)s, status = %(status)s, ver = ver + 1
WHERE id = %(id)s
RETURNING ver;

-- name: wait_off
UPDATE batches SET status = 'queued', ver = ver + 1 WHERE id = %(id)s AND status = 'wait' RETURNING ver;

-- name: row_counts
SELECT status::text, count(*) FROM batchrows WHERE batch = %(id)s GROUP BY status;

-- name: abort_rows
UPDATE batchrows SET status = 'aborted', doneat = now()
WHERE batch = %(id)s AND status IN ('queued', 'inprog');

-- name: finish_batch
-- The final status and counts; mark_done is not due for aborted batches (notifiedat set at once), except
-- one ended with an `error` (its deadline passed: alya.batch.control), which gets its mark_done.
-- `error`: why the batch failed without its summary (it kept failing), else NULL.
-- synchronous_commit on: the end of a batch is what its client is shown as final, so its commit waits for
-- the WAL flush even in a transaction that began as a write-back (which commits without it; a slow query's
-- write-back ends its batch in the same transaction).
SET LOCAL synchronous_commit = on;
UPDATE batches SET status = %(status)s, doneat = now(), nsuccess = %(nsuccess)s, nfailed = %(nfailed)s,
       naborted = %(naborted)s, outputfiles = %(outputfiles)s::jsonb, ver = ver + 1,
       notifiedat = CASE WHEN %(status)s::batch_status = 'aborted' AND %(error)s::text IS NULL THEN now() END, error = %(error)s
WHERE id = %(id)s
RETURNING ver, doneat;

-- name: summary_failed
-- A summary attempt of an open batch failed with `error`: count it if it failed the same way as the
-- last one, else start counting again. Returns (failures in a row, seconds since the first of them).
-- (SET expressions see the row as it was, so each CASE compares with the previous error.)
UPDATE batches
SET sumfails = CASE WHEN sumerror IS NOT DISTINCT FROM %(error)s THEN sumfails + 1 ELSE 1 END,
    sumsince = CASE WHEN sumerror IS NOT DISTINCT FROM %(error)s THEN sumsince ELSE now() END,
    sumerror = %(error)s
WHERE id = %(id)s AND status IN ('queued', 'inprog')
RETURNING sumfails, extract(epoch FROM now() - sumsince)::float8;

-- name: batch_rows
SELECT line, status::text, res, messages FROM batchrows WHERE batch = %(id)s ORDER BY line;

-- name: batch_blobrows
SELECT blobrows FROM batchrows WHERE batch = %(id)s AND blobrows IS NOT NULL ORDER BY line;

-- name: slowquery_row
SELECT status::text, res, messages, blobrows FROM batchrows WHERE batch = %(id)s AND line = 0;

-- name: list_batches
SELECT {batch_columns}
FROM batches
WHERE app = %(app)s AND type = %(type)s AND (%(op)s::text IS NULL OR op = %(op)s)
  AND reqat >= now() - make_interval(days => %(age_days)s)
ORDER BY reqat DESC;

-- name: open_batches
-- Batches of one batch type that have rows to claim now: the 100 first by priority (higher first), then
-- age, and always the 10 oldest whatever their priority (the producer gives a reserved share of claims to
-- lower priorities: they must be in the list to get it, however many higher ones are open). `only` (a
-- dispatched flow run's batch) restricts to that batch, so that cancelling one batch's run never
-- interrupts another batch. Only batches of the registered kind (B or Q): a processor of the other kind is
-- not this worker's. The EXISTS (one probe of the partial index of queued rows per batch) keeps batches
-- whose rows are all held or waiting out a retry delay from filling the list and hiding a claimable one.
-- A paused batch, or one whose not_before has not come, is left out (its rows stay queued, untouched), so
-- that no worker claims or spins on it; both are read from the batch row the filter already reads.
-- enable_bitmapscan off: a bitmap scan reads every entry of the batch's partial index (dead ones too, until
-- VACUUM) before it returns the first row; the generic plan of the prepared statement picked one for
-- the existence probe and read 200,000 entries per call on a 200k-row batch (7.5 ms; the plain probe
-- stops at the first live entry).
SET LOCAL enable_bitmapscan = off;
WITH open AS (
    SELECT b.id, b.priority, b.reqat FROM batches b
    WHERE b.app = %(app)s AND b.op = %(op)s AND b.type = %(type)s AND b.status IN ('queued', 'inprog')
      AND (%(only)s::uuid IS NULL OR b.id = %(only)s::uuid)
      AND NOT b.paused AND (b.notbefore IS NULL OR b.notbefore <= now())  -- batch control: on the batch row
      AND EXISTS (SELECT 1 FROM batchrows r
                  WHERE r.batch = b.id AND r.status = 'queued' AND (r.notbefore IS NULL OR r.notbefore <= now()))
), listed AS (
    (SELECT * FROM open ORDER BY priority DESC, reqat LIMIT 100)
    UNION
    (SELECT * FROM open ORDER BY reqat LIMIT 10)
)
SELECT b.id, b.status::text, b.ver, b.priority FROM listed JOIN batches b ON b.id = listed.id
ORDER BY listed.priority DESC, listed.reqat;

-- name: batch_context
-- A batch's context, read once per worker process (it never changes): not with every claim.
SELECT context FROM batches WHERE id = %(id)s;

-- name: claim_rows
-- One chunk of one batch: queued rows in line order from `after` (the worker's last claim, so that the
-- scan does not wade through index entries of rows already done), skipping rows others are claiming.
-- enable_sort off: a new batch is never in the planner's statistics, so it guesses "few rows" and would
-- sort every queued row of the batch per claim; an ordered walk of the partial index is what we want.
-- synchronous_commit off: a claim lost in a server crash only leaves its rows queued (the late
-- write-back is then refused), so waiting for the WAL flush buys nothing here.
SET LOCAL synchronous_commit = off;
SET LOCAL enable_sort = off;
WITH picked AS (
    SELECT line FROM batchrows
    WHERE batch = %(batch)s AND status = 'queued' AND line >= %(after)s AND NOT suspect
      AND (notbefore IS NULL OR notbefore <= now())
    ORDER BY line
    LIMIT %(n)s
    FOR UPDATE SKIP LOCKED
)
UPDATE batchrows r SET status = 'inprog', doneby = %(worker)s, attempts = r.attempts + 1
FROM picked WHERE r.batch = %(batch)s AND r.line = picked.line
RETURNING r.line, r.input::text, r.attempts;

-- name: claim_suspect
-- One suspect row (held by a worker that died), to be run alone: see recover_rows.
SET LOCAL synchronous_commit = off;
WITH picked AS (
    SELECT line FROM batchrows
    WHERE batch = %(batch)s AND status = 'queued' AND suspect AND (notbefore IS NULL OR notbefore <= now())
    ORDER BY line
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE batchrows r SET status = 'inprog', doneby = %(worker)s, attempts = r.attempts + 1
FROM picked WHERE r.batch = %(batch)s AND r.line = picked.line
RETURNING r.line, r.input::text, r.attempts;

-- name: app_rows_in_progress
-- For ALYA_APP_LIMITS: the app's rows in progress now (all workers, and this one), and the live workers,
-- under a transaction-scoped lock of the app, so that claims of one app are serialised across all workers
-- and the limit holds exactly (claimed rows count, started or not). Walks the open-batches index and the
-- partial index of in-progress rows.
SELECT pg_advisory_xact_lock(hashtext('alya-app-limit:' || %(app)s));
SELECT count(*), count(*) FILTER (WHERE r.doneby = %(worker)s),
       (SELECT count(*) FROM workers WHERE lastseen > now() - make_interval(secs => %(sec)s))
FROM batchrows r JOIN batches b ON b.id = r.batch
WHERE b.app = %(app)s AND b.status IN ('queued', 'inprog') AND r.status = 'inprog';

-- name: batch_to_inprog
UPDATE batches SET status = 'inprog', ver = ver + 1 WHERE id = %(batch)s AND status = 'queued'
RETURNING ver, nrows;

-- name: write_results
-- Acknowledge finished rows (one statement per batch and flush): only rows this worker still holds, at
-- the attempt it claimed, are written, so a late answer from a worker whose rows were recovered changes
-- nothing. After an abort (which turns the batch's queued and in-progress rows `aborted`, keeping
-- `doneby`), a row whose call returned before the abort's commit still gets its result: the batch's
-- counts move from aborted to success/failed in the same statement, and its version moves on.
-- Returns the batch's status (every flush is an abort check), rows written, and of those rows written
-- after an abort, with the batch's new version.
-- synchronous_commit off: a result lost in a server crash leaves its rows inprog, and recovery
-- requeues them (processing is at-least-once; counts come from row statuses, so nothing counts twice).
-- The batch row is key-share locked first (writers share it; abort's FOR UPDATE waits for them, and they
-- for it): abort locks the batch and then the rows, and rows locked in two different orders deadlock.
SET LOCAL synchronous_commit = off;
-- No hash or merge join: the UPDATE must reach each row by its tuple id (a Tid Scan per row). Its `batch`
-- filter (a tuple id is unique only within a partition: migration 0012) let the planner, guessing a few
-- hundred rows for a batch it has no statistics for, hash-join the whole batch instead: read by that filter
-- at every write-back (measured: no-op throughput halved).
SET LOCAL enable_hashjoin = off;
SET LOCAL enable_mergejoin = off;
SELECT 1 FROM batches WHERE id = %(batch)s FOR KEY SHARE;
-- The rows are found by one primary-key probe per line (`t`: a LATERAL look-up with LIMIT is run per
-- row as written, whatever the planner guesses for a batch it has no statistics for), then updated by
-- their tuple id. Never through the partial index of in-progress rows: it is on `batch` alone and keeps
-- an entry for every row that was ever in progress until VACUUM, so reading it per write-back cost
-- O(rows done so far): 100 entries per row at 200k rows, 640 at 1M. (`status::text` keeps the planner
-- from using it.) A row changed since the look-up (an abort) has a new tuple id and is not written.
WITH v AS MATERIALIZED (
    SELECT * FROM unnest(%(lines)s::int[], %(attempts)s::int[], %(statuses)s::text[], %(res)s::text[],
                         %(messages)s::text[], %(blobrows)s::text[], %(delays)s::float8[])
        AS v(line, attempts, status, res, messages, blobrows, delay)  -- `finished`: write_results_late only
), t AS MATERIALIZED (
    SELECT p.tid, v.* FROM v CROSS JOIN LATERAL (
        SELECT r.ctid AS tid FROM batchrows r
        WHERE r.batch = %(batch)s AND r.line = v.line AND r.status::text = 'inprog' AND r.doneby = %(worker)s
          AND r.attempts = v.attempts
        LIMIT 1
    ) p
), w AS (
    UPDATE batchrows r
    SET status = t.status::batch_status,
        res = t.res::jsonb,
        messages = t.messages::jsonb,
        blobrows = t.blobrows::jsonb,
        doneat = CASE WHEN t.status = 'queued' THEN NULL ELSE now() END,
        doneby = CASE WHEN t.status = 'queued' THEN NULL ELSE r.doneby END,
        notbefore = CASE WHEN t.status = 'queued' THEN now() + make_interval(secs => t.delay) END
    FROM t
    WHERE r.batch = %(batch)s AND r.ctid = t.tid  -- unique only within a partition (0012): see above
    RETURNING 1
)
SELECT (SELECT status::text FROM batches WHERE id = %(batch)s), (SELECT count(*) FROM w), 0, NULL::int;

-- name: write_results_late
-- After an abort only (write_results found the batch aborted and rows not written): rows whose call
-- returned before the abort committed get their results, and the batch's counts move from aborted to
-- success/failed in the same statement; a requeue (a fault) is not a result. Returns (rows, new version).
-- Not after a batch ended with an `error` (its deadline passed): its output files and mark_done were made
-- from the rows as they were then, and its rows stay as those say.
WITH b AS (
    SELECT id, status, doneat FROM batches WHERE id = %(batch)s AND error IS NULL FOR KEY SHARE
), late AS (
    UPDATE batchrows r
    SET status = v.status::batch_status, res = v.res::jsonb, messages = v.messages::jsonb,
        blobrows = v.blobrows::jsonb, doneat = now()
    FROM unnest(%(lines)s::int[], %(attempts)s::int[], %(statuses)s::text[], %(res)s::text[],
                %(messages)s::text[], %(blobrows)s::text[], %(delays)s::float8[], %(finished)s::float8[])
         AS v(line, attempts, status, res, messages, blobrows, delay, finished), b
    WHERE b.status = 'aborted' AND r.batch = %(batch)s AND r.line = v.line AND r.status = 'aborted'
      AND r.doneby = %(worker)s AND r.attempts = v.attempts AND v.status <> 'queued'
      AND to_timestamp(v.finished) <= b.doneat
    RETURNING v.status AS new
), fix AS (
    UPDATE batches SET nsuccess = nsuccess + (SELECT count(*) FROM late WHERE new = 'success'),
                       nfailed = nfailed + (SELECT count(*) FROM late WHERE new = 'failed'),
                       naborted = naborted - (SELECT count(*) FROM late),
                       ver = ver + 1
    WHERE id = %(batch)s AND EXISTS (SELECT 1 FROM late)
    RETURNING ver
)
SELECT (SELECT count(*) FROM late), (SELECT ver FROM fix);

-- name: batch_statuses
SELECT id, status::text FROM batches WHERE id = ANY(%(ids)s::uuid[]);

-- name: notify_work
-- Wakes idle workers (alya.engine.waker) when the transaction commits; the payload is app/op, or * for any.
SELECT pg_notify(%(channel)s, %(payload)s);

-- name: release_rows
-- Give claimed rows back untouched (shutdown, init failure): the attempt they cost is returned too.
-- Like write_results, only rows still held at the claimed attempt: a row recovered and claimed again
-- meanwhile (even by this same worker) belongs to that newer claim. Batch first, as in write_results.
SELECT 1 FROM batches WHERE id = %(batch)s FOR KEY SHARE;
UPDATE batchrows r SET status = 'queued', doneby = NULL, attempts = r.attempts - 1
FROM unnest(%(lines)s::int[], %(attempts)s::int[]) AS v(line, attempts)
WHERE r.batch = %(batch)s AND r.line = v.line AND r.status = 'inprog' AND r.doneby = %(worker)s
  AND r.attempts = v.attempts;

-- name: has_open_rows
-- Written as ordered LIMIT 1 look-ups so that the planner walks the partial indexes: as a plain EXISTS
-- it may pick a sequential scan (it expects queued rows everywhere), O(table) once per chunk.
SET LOCAL enable_bitmapscan = off;  -- an existence probe: see open_batches
SELECT (SELECT line FROM batchrows WHERE batch = %(id)s AND status = 'queued' ORDER BY line LIMIT 1) IS NOT NULL
    OR (SELECT line FROM batchrows WHERE batch = %(id)s AND status = 'inprog' LIMIT 1) IS NOT NULL;

-- name: queued_after
-- A queued row past `after`, if any: an index probe that starts where this worker's chunk ended.
SET LOCAL enable_bitmapscan = off;  -- an existence probe: see open_batches
SELECT line FROM batchrows WHERE batch = %(id)s AND status = 'queued' AND line > %(after)s ORDER BY line LIMIT 1;

-- name: lock_open_batch
-- The summariser's lock: whoever gets it first finds the batch open, everyone after finds it final.
SELECT {batch_columns}
FROM batches WHERE id = %(id)s AND status IN ('queued', 'inprog') FOR UPDATE;

-- name: claim_notify
UPDATE batches SET notifiedat = now() WHERE id = %(id)s AND notifiedat IS NULL RETURNING id;

-- name: unnotified_batches
SELECT id FROM batches
WHERE app = %(app)s AND op = %(op)s AND notifiedat IS NULL AND status IN ('success', 'failed', 'aborted');

-- name: unsummarised_batches
-- Open batches whose rows are all final: their summary was missed (crash, failed upload).
SET LOCAL enable_bitmapscan = off;  -- an existence probe: see open_batches
SELECT b.id FROM batches b
WHERE b.status IN ('queued', 'inprog')
  AND (SELECT line FROM batchrows r WHERE r.batch = b.id AND r.status = 'queued' ORDER BY line LIMIT 1) IS NULL
  AND (SELECT line FROM batchrows r WHERE r.batch = b.id AND r.status = 'inprog' LIMIT 1) IS NULL;

-- name: claimable_batch_types
-- Types with a row to claim now: an open batch whose rows are all held by other workers or waiting for
-- their retry backoff gives a worker nothing to do (an empty flow run per poll, otherwise).
SET LOCAL enable_bitmapscan = off;  -- an existence probe: see open_batches
SELECT DISTINCT b.app, b.op, b.type FROM batches b
WHERE b.status IN ('queued', 'inprog') AND NOT b.paused AND (b.notbefore IS NULL OR b.notbefore <= now())
  AND EXISTS (SELECT 1 FROM batchrows r
              WHERE r.batch = b.id AND r.status = 'queued' AND (r.notbefore IS NULL OR r.notbefore <= now()));

-- name: open_work_exists
-- Is any of these batch types' work queued or in progress (dead workers' rows count until recovered)?
-- A type is app/op/kind: a slow query of an (app, op) served here as a batch type is not our work.
SELECT EXISTS (
    SELECT 1 FROM batches
    WHERE status IN ('queued', 'inprog') AND (app || '/' || op || '/' || type) = ANY(%(types)s::text[])
);

-- name: heartbeat
INSERT INTO workers (id, host, pid) VALUES (%(id)s, %(host)s, %(pid)s)
ON CONFLICT (id) DO UPDATE SET lastseen = now();

-- name: server_started
-- When the PostgreSQL server started: a change between two heartbeats means it restarted, and write-backs
-- acknowledged with synchronous_commit off may have been lost (see Engine._beat).
SELECT pg_postmaster_start_time();

-- name: forget_worker
DELETE FROM workers WHERE id = %(id)s;

-- name: recover_rows
-- Rows held by a worker silent for recovery_sec go back to the queue. Which of them killed it (if one
-- did) is unknown: they become suspects and get their attempt back. A suspect is run alone, so a suspect
-- held by a dead worker was the only row it held: that one spends its attempt, and once its attempts
-- are used up it fails (it is what kills workers) while every other row of the claim runs normally.
WITH dead AS (
    SELECT r.batch, r.line, r.doneby AS worker FROM batchrows r
    WHERE r.status = 'inprog'
      AND NOT EXISTS (SELECT 1 FROM workers w
                      WHERE w.id = r.doneby AND w.lastseen > now() - make_interval(secs => %(sec)s))
    FOR UPDATE SKIP LOCKED
)
UPDATE batchrows r
SET status = CASE WHEN r.suspect AND r.attempts >= %(max_attempts)s THEN 'failed'::batch_status ELSE 'queued' END,
    doneby = CASE WHEN r.suspect AND r.attempts >= %(max_attempts)s THEN r.doneby END,
    doneat = CASE WHEN r.suspect AND r.attempts >= %(max_attempts)s THEN now() END,
    messages = CASE WHEN r.suspect AND r.attempts >= %(max_attempts)s THEN %(fail_messages)s::jsonb
                    ELSE r.messages END,
    attempts = CASE WHEN r.suspect THEN r.attempts ELSE greatest(r.attempts - 1, 0) END,
    suspect = true
FROM dead WHERE r.batch = dead.batch AND r.line = dead.line
RETURNING r.batch, r.line, r.status::text, dead.worker;

-- name: take_leases
-- Maintenance duties this holder has now: each one it held (renewed) or whose lease ran out (taken), for
-- `sec` more seconds. A lease held by another, not yet expired, is left alone (no row returned).
INSERT INTO maintenance_leases AS l (duty, holder, expires)
SELECT d, %(holder)s, now() + make_interval(secs => %(sec)s) FROM unnest(%(duties)s::text[]) AS d
ON CONFLICT (duty) DO UPDATE SET holder = EXCLUDED.holder, expires = EXCLUDED.expires
WHERE l.holder = EXCLUDED.holder OR l.expires < now()
RETURNING duty;

-- name: drop_leases
-- A holder that stops gives its duties up at once (another worker takes them at its next tick).
DELETE FROM maintenance_leases WHERE holder = %(holder)s;

-- name: forget_dead_workers
DELETE FROM workers WHERE lastseen < now() - make_interval(secs => %(sec)s * 10);

-- name: insert_query
-- A slow query without an idempotency key, in one statement (one round trip on the path a web call waits
-- on, instead of five): its record (queued, one row), its row (line 0), the row's count (as count_inserted)
-- and the wake-up of its type's workers at the commit (as notify_work). The row's foreign key is checked at
-- the end of the statement, when the record is there.
WITH b AS (
    INSERT INTO batches (id, app, op, type, context, inputfile, status, nrows, priority)
    VALUES (%(id)s, %(app)s, %(op)s, 'Q', %(context)s::jsonb, NULL, 'queued', 1, %(priority)s)
    RETURNING id, ver
), r AS (
    INSERT INTO batchrows (batch, line, input) SELECT id, 0, %(input)s::jsonb FROM b
), c AS (
    INSERT INTO batch_counts (batch, status, shard, n) SELECT id, 'queued', pg_backend_pid(), 1 FROM b
)
SELECT ver, pg_notify(%(channel)s, %(payload)s) FROM b;

-- name: insert_row
INSERT INTO batchrows (batch, line, input) VALUES (%(batch)s, %(line)s, %(input)s::jsonb);

-- name: open_batches_all
-- (the sweeper's redispatch: a paused batch, or one whose not_before has not come, needs no flow run yet)
SELECT id, app, op FROM batches
WHERE status IN ('queued', 'inprog') AND NOT paused AND (notbefore IS NULL OR notbefore <= now())
ORDER BY reqat LIMIT 1000;

-- name: stalled_batches
-- Open batches with rows to claim now and none in progress under a live worker: if Prefect still shows a
-- run of theirs as Running (for longer than recovery), that run is not working on them (its machine is lost).
SET LOCAL enable_bitmapscan = off;  -- an existence probe: see open_batches
SELECT b.id FROM batches b
WHERE b.status IN ('queued', 'inprog') AND NOT b.paused AND (b.notbefore IS NULL OR b.notbefore <= now())
  AND EXISTS (SELECT 1 FROM batchrows r
              WHERE r.batch = b.id AND r.status = 'queued' AND (r.notbefore IS NULL OR r.notbefore <= now()))
  AND NOT EXISTS (SELECT 1 FROM batchrows r JOIN workers w ON w.id = r.doneby
                  WHERE r.batch = b.id AND r.status = 'inprog'
                    AND w.lastseen > now() - make_interval(secs => %(sec)s));

-- name: next_claimable_in
-- Seconds until the batch's first queued row may be claimed (rows wait out a retry delay, the batch its
-- not_before); NULL: none, or the batch is paused (its run ends; batch_resume dispatches a new one).
SELECT extract(epoch FROM greatest(min(coalesce(r.notbefore, now())), min(b.notbefore)) - now())::float8
FROM batchrows r JOIN batches b ON b.id = r.batch
WHERE r.batch = %(id)s AND r.status = 'queued' AND NOT b.paused;

-- name: savepoint
SAVEPOINT alya_savepoint;

-- name: rollback_to_savepoint
ROLLBACK TO SAVEPOINT alya_savepoint;

-- name: release_savepoint
RELEASE SAVEPOINT alya_savepoint;

-- ---------------------------------------------------------------------------- batch control (alya.batch.control)
-- name: set_schedule
-- A new batch's not_before and deadline (in the submit's transaction; only when one is given).
UPDATE batches SET notbefore = %(notbefore)s, deadline = %(deadline)s WHERE id = %(id)s;

-- name: set_paused
-- Pause or resume a batch the caller holds locked. The version moves, so that the cache takes the flag.
UPDATE batches SET paused = %(paused)s, ver = ver + 1 WHERE id = %(id)s RETURNING ver;

-- name: due_deadlines
-- Open batches whose deadline has passed, oldest deadline first (partial index batches_deadline).
SELECT id FROM batches
WHERE deadline IS NOT NULL AND status IN ('wait', 'queued', 'inprog') AND deadline <= now()
ORDER BY deadline LIMIT 100;

-- name: started_types
-- Types of open batches whose not_before came within the last `sec` seconds (partial index
-- batches_notbefore): the maintenance leader wakes their workers, which do not poll for it. A batch may be
-- announced twice (consecutive passes overlap); a wake-up with nothing to claim costs one look.
SELECT DISTINCT app, op FROM batches
WHERE notbefore IS NOT NULL AND status IN ('wait', 'queued', 'inprog') AND NOT paused
  AND notbefore > now() - make_interval(secs => %(sec)s) AND notbefore <= now();

-- ---------------------------------------------------------------------------- file intake (alya.batch.intake)
-- name: lock_file
-- Everyone who takes the file at this URL (a scan on any machine, file_submit) queues here until the
-- transaction that records it ends; the look-up that follows then sees the winner's record.
SELECT pg_advisory_xact_lock(hashtextextended('alya_file:' || %(url)s, 0));

-- name: try_lock_file
-- A scan does not queue: a file that another scan is taking right now is that scan's.
SELECT pg_try_advisory_xact_lock(hashtextextended('alya_file:' || %(url)s, 0));

-- name: get_file
SELECT {file_columns}
FROM batch_files WHERE url = %(url)s AND size = %(size)s AND version = %(version)s;

-- name: files_at
-- Records of the files a listing shows (served by the unique key's index, url first).
SELECT {file_columns}
FROM batch_files WHERE url = ANY(%(urls)s::text[]);

-- name: insert_file
INSERT INTO batch_files (id, url, size, version, filetype, status, batch, nrows, error, dest)
VALUES (%(id)s, %(url)s, %(size)s, %(version)s, %(filetype)s, %(status)s, %(batch)s, %(nrows)s, %(error)s,
        %(dest)s)
RETURNING {file_columns};

-- name: file_moved
UPDATE batch_files SET dest = %(dest)s, movedat = coalesce(movedat, now())
WHERE id = %(id)s
RETURNING {file_columns};

-- name: list_files
SELECT {file_columns}
FROM batch_files
WHERE reqat >= now() - make_interval(days => %(age_days)s)
ORDER BY reqat DESC;

-- ---------------------------------------------------------------------------- retention (alya.batch.retention)
-- name: purgeable_batches
-- Final batches (and slow queries) that ended before `before`, oldest first, after the (doneat, id) cursor
-- of the previous page: each is visited once per purge, even when another purge holds it locked. Walks the
-- partial index batches_final_doneat; open batches are never in it.
SELECT id, app, op, nrows, outputfiles, doneat FROM batches
WHERE status IN ('success', 'failed', 'aborted') AND doneat < %(before)s
  AND (doneat, id) > (%(after_at)s::timestamptz, %(after_id)s::uuid)
  AND (%(app)s::text IS NULL OR app = %(app)s)
ORDER BY doneat, id
LIMIT %(n)s;

-- name: purge_rows
-- Up to `n` rows of one purgeable batch, in line order after `after` (so that each step starts past the
-- index entries of rows the last one deleted): a big batch goes in bounded transactions. The batch is
-- locked first (skipped if another purge holds it) and must still be final and older than `before`.
-- Rows are picked by an ordered walk of the primary key and deleted as that range of lines (after, last
-- picked], another walk of the same key (the batch is final: no row enters it). Not by tuple id: with
-- batchrows partitioned (migration 0012) a tuple id needs the `batch` filter for its partition, and the
-- planner, guessing few rows for a batch it has no statistics for, then read the whole batch by that filter.
-- Returns (rows, last line).
WITH b AS (
    SELECT id FROM batches
    WHERE id = %(id)s AND status IN ('success', 'failed', 'aborted') AND doneat < %(before)s
    FOR UPDATE SKIP LOCKED
), pick AS MATERIALIZED (
    SELECT r.line FROM batchrows r
    WHERE r.batch = (SELECT id FROM b) AND r.line > %(after)s ORDER BY r.line LIMIT %(n)s
), gone AS (
    DELETE FROM batchrows r WHERE r.batch = %(id)s AND r.line > %(after)s AND r.line <= (SELECT max(line) FROM pick)
    RETURNING r.line
)
SELECT count(*), coalesce(max(line), %(after)s) FROM gone;

-- name: purge_batches
-- Delete these batches, if they are still final and older than `before` and no other purge holds them,
-- with their rows and their file-intake records (the idempotency key lives on the batch row). Every
-- look-up is an index probe per batch (= ANY(array)), never a join the planner could turn into a scan.
-- Returns (ids deleted, rows deleted, records deleted).
WITH b AS MATERIALIZED (
    SELECT id FROM batches
    WHERE id = ANY(%(ids)s::uuid[]) AND status IN ('success', 'failed', 'aborted') AND doneat < %(before)s
    FOR UPDATE SKIP LOCKED
), f AS (
    DELETE FROM batch_files WHERE batch = ANY(ARRAY(SELECT id FROM b)) RETURNING 1
), r AS (
    DELETE FROM batchrows WHERE batch = ANY(ARRAY(SELECT id FROM b)) RETURNING 1
), gone AS (
    DELETE FROM batches WHERE id = ANY(ARRAY(SELECT id FROM b)) RETURNING id
)
SELECT ARRAY(SELECT id::text FROM gone), (SELECT count(*) FROM r), (SELECT count(*) FROM f);

-- name: purge_rejected_files
-- Records of rejected files (they have no batch) taken before `before`, at most `n`, oldest first.
DELETE FROM batch_files WHERE id IN (
    SELECT id FROM batch_files WHERE status = 'rejected' AND reqat < %(before)s ORDER BY reqat LIMIT %(n)s
);

-- ---------------------------------------------------------------------------- metrics (alya.batch.monitor)
-- name: queue_depths
-- Per batch type with open batches: rows queued, rows in progress (from the counters, migration 0011: a few
-- index entries per open batch, whatever its size), and the age of the oldest open batch that still has
-- queued rows (its submit time: rows appended later, or requeued, count from the batch's submit; reading
-- the rows' own times was O(queued rows), 480 ms at 1,000,000). Walks the partial index of open batches.
WITH per AS (
    SELECT b.app, b.op, b.type, b.reqat,
           coalesce(sum(c.n) FILTER (WHERE c.status = 'queued'), 0) AS queued,
           coalesce(sum(c.n) FILTER (WHERE c.status = 'inprog'), 0) AS inprog
    FROM batches b LEFT JOIN batch_counts c ON c.batch = b.id
    WHERE b.status IN ('queued', 'inprog')
    GROUP BY b.id
)
SELECT app, op, type, sum(queued), sum(inprog),
       extract(epoch FROM now() - min(reqat) FILTER (WHERE queued > 0))::float8
FROM per GROUP BY app, op, type ORDER BY app, op, type;

-- name: live_workers
SELECT count(*) FROM workers WHERE lastseen > now() - make_interval(secs => %(sec)s);

-- ---------------------------------------------------------------------------- failures: thresholds, retries (alya.batch.failures)
-- name: set_failure_limit
-- A submit's failure threshold, in the submit's transaction: rows, or a fraction of the batch's rows (at most
-- one of the two). Fixed from then on; a wait batch's fraction applies to its rows when it is released.
UPDATE batches SET max_failures = %(max_failures)s, max_failure_ratio = %(ratio)s WHERE id = %(id)s;

-- name: batch_has_failure_limit
-- Whether the batch has a failure threshold (it never changes after the submit: a worker reads it once).
SELECT max_failures IS NOT NULL OR max_failure_ratio IS NOT NULL FROM batches WHERE id = %(id)s;

-- name: failure_limit
-- An open batch's failure threshold as rows (a fraction of its rows, rounded down: more failed rows than
-- that stop it), its rows, and its failed rows counted up to limit + 1 only: the count walks the partial
-- index of failed rows (batchrows_failed) and stops there, O(limit) whatever the batch's size. No row: the
-- batch has no threshold or is no longer open (one primary-key probe). Every failed row is this round's:
-- a retry requeues every failed row.
WITH b AS (
    SELECT id, nrows, coalesce(max_failures, floor(max_failure_ratio * nrows)::int) AS lim
    FROM batches
    WHERE id = %(id)s AND status IN ('queued', 'inprog')
      AND (max_failures IS NOT NULL OR max_failure_ratio IS NOT NULL)
)
SELECT b.nrows, b.lim,
       (SELECT count(*) FROM (SELECT 1 FROM batchrows r
                              WHERE r.batch = %(id)s AND r.status = 'failed' LIMIT b.lim + 1) f)
FROM b;

-- name: reopen_batch
-- A retry: a final `failed` batch (not a slow query) is queued again, one round on, as if never summarised.
-- Conditional on its status, so that of two retries at once the second (waiting on the row lock) finds it
-- queued and changes nothing. The stored counts are left alone (an open batch's are counted from its rows).
UPDATE batches SET status = 'queued', round = round + 1, doneat = NULL, notifiedat = NULL, error = NULL,
       outputfiles = '{}'::jsonb, sumfails = 0, sumerror = NULL, sumsince = NULL, ver = ver + 1
WHERE id = %(id)s AND status = 'failed' AND type = 'B'
RETURNING {batch_columns};

-- name: requeue_rows
-- A retry's rows of one final status go back to the queue as new (attempts reset, result, messages and blob
-- rows cleared): one set-based statement per status, so a trigger-kept counter sees each row move from that
-- status to queued. `failed` walks the partial index of failed rows; `aborted` the batch's primary key.
UPDATE batchrows SET status = 'queued', attempts = 0, res = NULL, messages = NULL, blobrows = NULL,
       doneat = NULL, doneby = NULL, notbefore = NULL, suspect = false
WHERE batch = %(batch)s AND status = %(status)s::batch_status;

-- name: batch_rows_of_status
-- A final batch's rows of one status (NULL: all), in line order, results (alya done --export --status).
SELECT line, status::text, res, messages FROM batchrows
WHERE batch = %(id)s AND (%(status)s::text IS NULL OR status = %(status)s::batch_status)
ORDER BY line;

-- name: batch_inputs
-- A batch's rows of one status (NULL: all), in line order, as submitted: what `alya submit` takes back.
SELECT line, input FROM batchrows
WHERE batch = %(id)s AND (%(status)s::text IS NULL OR status = %(status)s::batch_status)
ORDER BY line;

-- name: batch_input_keys
-- The input keys of those rows, in order of first appearance: the columns of a CSV of them.
SELECT k FROM (
    SELECT k, min(r.line) AS first FROM batchrows r, jsonb_object_keys(r.input) AS k
    WHERE r.batch = %(id)s AND (%(status)s::text IS NULL OR r.status = %(status)s::batch_status)
    GROUP BY k
) keys ORDER BY first, k;

-- ---------------------------------------------------------------------------- counters (alya.db.counters)
-- name: batch_counts
-- A batch's rows by status: the sum of its shard rows (one index range of the primary key).
SELECT status::text, sum(n) FROM batch_counts WHERE batch = %(id)s GROUP BY status HAVING sum(n) <> 0;

-- name: failed_rows
-- A batch's failed rows, exactly: a walk of the partial index of failed rows, O(failed rows). A batch's end
-- checks its counters with it (alya.batch.finish) instead of recounting every row.
SELECT count(*) FROM batchrows WHERE batch = %(id)s AND status = 'failed';

-- name: count_inserted
-- `n` rows just inserted (COPY, a slow query's row), all queued: counted by the inserting transaction.
INSERT INTO batch_counts AS c (batch, status, shard, n) VALUES (%(batch)s, 'queued', pg_backend_pid(), %(n)s)
ON CONFLICT (batch, status, shard) DO UPDATE SET n = c.n + EXCLUDED.n;

-- name: crowded_counts
-- Open batches with more than `over` counter rows outside shard 0 (backends that touched them), at most `n`:
-- maintenance folds them (fold_counts). Walks the open batches; a probe of the primary key each.
SELECT b.id FROM batches b
WHERE b.status IN ('wait', 'queued', 'inprog')
  AND (SELECT count(*) FROM batch_counts c WHERE c.batch = b.id AND c.shard <> 0) > %(over)s
LIMIT %(n)s;

-- name: fold_counts
-- Fold these batches' shard rows into shard 0 (no backend has pid 0); statuses that sum to zero leave no
-- row. Rows a transaction holds (its statement's upsert, until it commits) are skipped, so this never
-- waits for a worker; a worker may wait for this one statement. Returns the counter rows folded.
WITH gone AS (
    DELETE FROM batch_counts c
    WHERE c.ctid = ANY(ARRAY(SELECT x.ctid FROM batch_counts x
                             WHERE x.batch = ANY(%(ids)s::uuid[]) AND x.shard <> 0
                             FOR UPDATE SKIP LOCKED))
    RETURNING c.batch, c.status, c.n
), folded AS (
    INSERT INTO batch_counts AS c (batch, status, shard, n)
    SELECT batch, status, 0, sum(n)::int FROM gone GROUP BY batch, status HAVING sum(n) <> 0
    ORDER BY batch, status
    ON CONFLICT (batch, status, shard) DO UPDATE SET n = c.n + EXCLUDED.n
)
SELECT count(*) FROM gone;
