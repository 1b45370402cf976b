"""Several machines sharing batches, on simulated hosts (network namespaces, tests/support/netns.py): each host runs
alya workers started the way a user starts them on a machine, against PostgreSQL, Redis, S3 and a Prefect
server reached over the (simulated) network.

- Prefect process workers, one per host on one work pool (the repository's prefect.yaml deployments plus
  the probe batch type tests/support/mh_app.py, through deployments/deploy.sh), ALYA_DISPATCH=prefect: one large
  batch and many small ones (the probe's and the bank example's). Every row is processed exactly once, on
  more than one host; counts, output lines, mark_done and bank balances are exact.
- ``alya worker tests.support.mh_app:jm`` on each host, ALYA_RECOVERY_SEC=5: the network of a host holding rows is
  cut mid-batch. Its rows come back within the recovery time and finish on the other hosts; when its link
  returns, its late write-backs change nothing.

The probe processor journals every call on its own host (a file per host), so "exactly once" is counted
from what the processors really did, not from what the database says. Skipped where namespaces cannot be
made (not root, no iproute2); carries the markers ``multihost`` and ``slow``.

Hook for later tests (per-app limits across machines, ...): the module-scoped ``cluster`` fixture (3 hosts,
services, a Prefect server) and ``mhdb`` (a database of its own); ``cluster.on_each_host(args, name, db,
**env)`` runs anything on every host, ``cluster.alya_worker`` / ``cluster.prefect_worker`` start workers.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
import pytest
import yaml

from alya import BatchInput, JobManager
from tests.support import netns, services
from tests.support.cluster import BIN, REPO, Cluster, wait_for
from tests.support.config import make_config

pytestmark = [pytest.mark.multihost, pytest.mark.slow]

RECOVERY_SEC = 5
POOL = "alya-pool"  # prefect.yaml's work pool
CHUNK = 20


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three simulated hosts, the services relayed to them, a Prefect server on the bridge address.
    Skips (before starting anything) where network namespaces cannot be made."""
    reason = netns.unavailable()
    if reason:
        pytest.skip(f"no simulated hosts: {reason}")
    s3_server = request.getfixturevalue("s3_server")
    t0 = time.monotonic()
    with Cluster(tmp_path_factory.mktemp("multihost"), nhosts=3, s3=s3_server) as c:
        print(f"cluster of {len(c.hosts)} hosts up in {time.monotonic() - t0:.1f}s")
        names = [h.ns for h in c.hosts] + [c.net.bridge]
        yield c
    left = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout + \
        subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [n for n in names if re.search(rf"\b{re.escape(n)}\b", left)], f"left behind: {left}"


@pytest.fixture
def mhdb(template_db: str) -> Iterator[str]:
    """A database of its own (name, not URL). Sessions idle inside a transaction are ended after 4 s: a
    host cut off in the middle of a transaction must not keep its row locks (recovery skips locked rows)
    for as long as the cut lasts. Production databases want the same setting (deployments/README.md)."""
    name = services.clone_database(template_db)
    services.admin_exec(f"ALTER DATABASE \"{name}\" SET idle_in_transaction_session_timeout = '4s'")
    yield name
    services.drop_database(name)


@contextmanager
def prefect_api(url: str) -> Iterator[None]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


# ---------------------------------------------------------------------------------------------- helpers
def journal(cluster: Cluster, host: Any, db: str) -> Path:
    """The probe's journal on a host, one per test (its database): a flow run of an earlier test that is
    still ending cannot write into a later test's."""
    return cluster.workdir / host.name / f"journal-{db}"


def read_journals(cluster: Cluster, db: str) -> tuple[collections.Counter[tuple[str, int, str]], list[list[str]]]:
    """Calls as (tag, line, host) -> count, and the mark_done lines, from every host's journal."""
    calls: collections.Counter[tuple[str, int, str]] = collections.Counter()
    done: list[list[str]] = []
    for host in cluster.hosts:
        path = journal(cluster, host, db)
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            parts = line.split()
            if parts and parts[0] == "call":
                calls[(parts[1], int(parts[2]), parts[3])] += 1
            elif parts and parts[0] == "done":
                done.append(parts[1:])
    return calls, done


def submit_probe(jm: JobManager, tag: str, n: int, ms: int) -> str:
    return jm.batch_submit("mh", "rec", {"tag": tag}, [BatchInput(i, {"ms": ms}) for i in range(1, n + 1)])


def rows_by_host(database_url: str, batch: str | None = None) -> dict[str, int]:
    """Final rows per host (the host part of the worker id that wrote them)."""
    rows = services.sql(database_url, "SELECT split_part(doneby, ':', 1), count(*) FROM batchrows "
                        "WHERE status IN ('success', 'failed') AND (%s::uuid IS NULL OR batch = %s::uuid) "
                        "GROUP BY 1", batch, batch)
    return {h: int(n) for h, n in rows}


def row_snapshot(database_url: str) -> list[tuple[Any, ...]]:
    return services.sql(database_url, "SELECT batch, line, status::text, doneby, attempts, res::text, doneat "
                        "FROM batchrows ORDER BY batch, line")


def batch_snapshot(database_url: str) -> list[tuple[Any, ...]]:
    return services.sql(database_url, "SELECT id, status::text, nrows, nsuccess, nfailed, naborted, ver, "
                        "outputfiles::text, doneat, notifiedat FROM batches ORDER BY id")


def check_batches(jm: JobManager, cluster: Cluster, db: str, probes: dict[str, tuple[str, int]]) -> dict[str, str]:
    """Every probe batch final and successful with its exact counts, its out.csv holding each line exactly
    once in line order, mark_done called exactly once; returns each output file's text."""
    _, done = read_journals(cluster, db)
    done_by_batch = collections.Counter(d[0] for d in done)
    texts = {}
    for bid, (tag, n) in probes.items():
        d = jm.batch_done(bid)
        assert (d.status.value, d.nsuccess, d.nfailed, d.naborted) == ("success", n, 0, 0), (tag, d.status)
        assert d.rows is not None and [r.line for r in d.rows] == list(range(1, n + 1))
        with fsspec.open(d.outputfiles["out.csv"], "rt") as fh:
            texts[bid] = fh.read()
        assert texts[bid].splitlines() == [f"{tag},{i}" for i in range(1, n + 1)], tag
        assert done_by_batch[bid] == 1, f"mark_done of {tag} called {done_by_batch[bid]} times"
    mine = [d for d in done if d[0] in probes]
    assert all(d[4:] == ["success", str(probes[d[0]][1]), "0"] for d in mine), mine
    return texts


# ---------------------------------------------------------------------------------------------- Prefect workers
def deploy_to_pool(cluster: Cluster, database: str) -> None:
    """deployments/deploy.sh with the repository's prefect.yaml plus the probe's deployment (one file).

    The sweeper is deployed without its every-minute schedule: the tests run it when they mean to. A
    scheduled sweep landing on a host that is then cut off would hold the sweeper's concurrency slot
    (``concurrency_limit: 1``) until Prefect's lease on it expires (300 s by default), and no sweep could
    run in the meantime (deployments/README.md)."""
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for dep in spec["deployments"]:
        dep.pop("schedules", None)
    pool = spec["deployments"][0]["work_pool"]
    spec["deployments"].append({"name": "mh-rec", "entrypoint": "tests/support/mh_app.py:mh_rec_flow", "parameters": {},
                                "tags": ["alya", "alya-app:mh", "alya-op:rec"], "work_pool": pool})
    path = cluster.workdir / "prefect.multihost.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {**cluster.base_env(), "PREFECT_API_URL": cluster.api_url, "PREFECT_HOME": str(cluster.workdir / "ops"),
           "ALYA_DATABASE_URL": cluster.database_url(database), "PREFECT": str(BIN / "prefect")}
    t0 = time.monotonic()
    out = subprocess.run(["bash", "deployments/deploy.sh", "--prefect-file", str(path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    print(f"deploy.sh (pool + 5 deployments) took {time.monotonic() - t0:.1f}s")


@pytest.fixture(scope="module")
def pool(cluster: Cluster) -> str:
    """The work pool with the deployments, made once per module (deployments do not name a database)."""
    deploy_to_pool(cluster, "unused")
    return POOL


def start_prefect_workers(cluster: Cluster, pool: str, db: str, settings: dict[str, str]) -> list[Any]:
    """``prefect worker start --pool`` on every host, named after the host and the test's database."""
    return [cluster.prefect_worker(h, pool, db, limit=2, name=f"{pool}-{h.name}-{db}",
                                   MH_JOURNAL=str(journal(cluster, h, db)), **settings) for h in cluster.hosts]


def wait_online(client: Any, pool: str, db: str, workers: list[Any]) -> None:
    wait_for(f"{len(workers)} process workers online", lambda: sum(
        w.status.value == "ONLINE" and w.name.endswith(db) for w in client.read_workers_for_work_pool(pool))
        >= len(workers), 120, workers)


def test_prefect_workers_share_batches_across_hosts(cluster: Cluster, pool: str, mhdb: str, s3_url: str) -> None:
    from prefect.client.orchestration import get_client

    bank = _bank()
    # Two rows at a time per flow run: the big batch (30 s of work for one run) outlasts the ~3 s it takes
    # the other hosts' workers to start their flow-run subprocesses.
    settings = {"ALYA_DISPATCH": "prefect", "ALYA_OBJECT_STORE_URL": s3_url, "ALYA_BATCHCHUNK_NROWS": str(CHUNK),
                "ALYA_WORKER_THREADS": "2", "ALYA_RECOVERY_SEC": str(RECOVERY_SEC), "ALYA_CONCURRENCY": "2"}
    workers = start_prefect_workers(cluster, pool, mhdb, settings)
    url = cluster.database_url(mhdb)
    with prefect_api(cluster.api_url), get_client(sync_client=True) as client:
        wait_online(client, pool, mhdb, workers)
        jm = JobManager(database_url=url, redis_url=services.REDIS_URL, object_store_url=s3_url,
                        config=make_config(dispatch="prefect", batchchunk_nrows=CHUNK, dispatch_rows_per_run=400,
                                           dispatch_max_runs=3))
        try:
            txns, opening = bank.make_transactions(300, naccounts=8, seed=11)
            bank.open_accounts(url, opening)
            t0 = time.monotonic()
            # ALYA_DISPATCH_ROWS_PER_RUN=400 (the submitting client's setting): the big batch gets three
            # dispatched flow runs, which the pool's workers on different hosts pick up.
            big = submit_probe(jm, "big", 1200, 50)
            # Its runs first, alone: submitted together with the others, the third could wait for a free slot
            # of the pool (two flow runs per worker) behind the small batches' runs until the big batch's other
            # two runs, on one host, had claimed every row (seen once in CI: all 1,200 rows on one host).
            wait_for("the big batch's rows on two hosts", lambda: sum(
                1 for n in rows_by_host(url, big).values() if n) >= 2 or jm.batch_status(big).status.is_final,
                     120, workers, every=0.2)
            probes = {big: ("big", 1200)}
            for i, n in enumerate((1, 3, 7, 12, 20, 33), 1):
                probes[submit_probe(jm, f"small{i}", n, 10)] = (f"small{i}", n)
            bank_ids = bank.submit_transactions(jm, txns, nbatches=3)
            every = [*probes, *bank_ids]
            wait_for("all batches final", lambda: all(jm.batch_status(b).status.is_final for b in every), 300,
                     workers, every=0.5)
            took = time.monotonic() - t0
            by_host = rows_by_host(url)
            big_by_host = rows_by_host(url, big)
            print(f"{len(every)} batches, {sum(n for _, n in probes.values()) + len(txns)} rows final in {took:.1f}s;"
                  f" rows per host {by_host}; big batch per host {big_by_host}")
            # the big batch itself was done on more than one host, by its own dispatched runs
            assert len([h for h, n in big_by_host.items() if n]) >= 2, big_by_host
            big_runs = list(client.read_flow_runs(flow_run_filter=_batch_runs(big)))
            assert len(big_runs) >= 3, [r.name for r in big_runs]
            wait_for("the big batch's runs to end", lambda: all(
                r.state.is_final() for r in client.read_flow_runs(flow_run_filter=_batch_runs(big))), 120, workers)
            ended = list(client.read_flow_runs(flow_run_filter=_batch_runs(big)))
            assert all(r.state.type.value == "COMPLETED" for r in ended), [(r.name, r.state) for r in ended]
            # only the run that summarised the batch says its outcome; the others say they helped
            outcome = [r for r in ended if r.state.message == "1,200 of 1,200 rows"]
            assert len(outcome) <= 1, [(r.name, r.state.message) for r in ended]

            # exactly once, on more than one host
            calls, _ = read_journals(cluster, mhdb)
            per_row = collections.Counter({(t, ln): 0 for t, n in probes.values() for ln in range(1, n + 1)})
            for (tag, line, _host), k in calls.items():
                per_row[(tag, line)] += k
            assert set(per_row.values()) == {1}, {k: v for k, v in per_row.items() if v != 1}
            assert len({h for (_, _, h) in calls}) >= 2, calls
            assert len([h for h, n in by_host.items() if n]) >= 2, by_host
            assert set(by_host) <= {h.name for h in cluster.hosts}, by_host
            check_batches(jm, cluster, mhdb, probes)
            # the bank example, deployed from prefect.yaml, ran on the same hosts: balances exact
            expected, refused = bank.expected_balances(txns, opening)
            assert bank.read_balances(url, expected) == expected
            assert sum(jm.batch_status(b).nfailed for b in bank_ids) == refused
            assert sum(jm.batch_status(b).nsuccess for b in bank_ids) == len(txns) - refused
        finally:
            jm.close()
            for w in workers:
                w.stop()


def _batch_runs(batch: str) -> Any:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    return FlowRunFilter(tags=FlowRunFilterTags(all_=[f"alya-batch:{batch}"]))


def _bank() -> Any:
    """flows/bank.py (importing it builds a JobManager from ALYA_*, connecting to nothing)."""
    import importlib

    saved = os.environ.get("ALYA_DATABASE_URL")
    os.environ.setdefault("ALYA_DATABASE_URL", "postgresql://nobody@127.0.0.1:9/unreachable")
    try:
        return importlib.import_module("flows.bank")
    finally:
        if saved is None:
            os.environ.pop("ALYA_DATABASE_URL", None)


# ---------------------------------------------------------------------------------------------- a host cut off
def held_rows(url: str, host: str) -> set[tuple[str, int]]:
    rows = services.sql(url, "SELECT batch::text, line FROM batchrows WHERE status = 'inprog' "
                        "AND split_part(doneby, ':', 1) = %s", host)
    return {(b, int(ln)) for b, ln in rows}


def done_rows(url: str, batch: str) -> int:
    return int(services.sql(url, "SELECT count(*) FROM batchrows WHERE batch = %s "
                            "AND status IN ('success', 'failed')", batch)[0][0])


def test_alya_workers_and_a_host_cut_off_mid_batch(cluster: Cluster, mhdb: str, s3_url: str) -> None:
    url = cluster.database_url(mhdb)
    settings = {"ALYA_OBJECT_STORE_URL": s3_url, "ALYA_BATCHCHUNK_NROWS": str(CHUNK), "ALYA_WORKER_THREADS": "2",
                "ALYA_RECOVERY_SEC": str(RECOVERY_SEC), "ALYA_LOG_LEVEL": "INFO"}
    workers = {h.name: cluster.alya_worker(h, "tests.support.mh_app:jm", mhdb,
                                           MH_JOURNAL=str(journal(cluster, h, mhdb)), **settings)
               for h in cluster.hosts}
    cluster.wait_workers(mhdb, len(cluster.hosts), procs=list(workers.values()))
    jm = JobManager(database_url=url, redis_url=services.REDIS_URL, object_store_url=s3_url,
                    config=make_config(batchchunk_nrows=CHUNK, recovery_sec=RECOVERY_SEC))
    victim = None
    try:
        nbig = 1500
        big = submit_probe(jm, "cutbig", nbig, 30)
        probes = {big: ("cutbig", nbig)}
        for i, n in enumerate((2, 5, 9, 17, 25, 40), 1):
            probes[submit_probe(jm, f"cutsmall{i}", n, 15)] = (f"cutsmall{i}", n)
        t0 = time.monotonic()

        # mid-batch (a quarter done), cut the host that holds the most rows right now
        wait_for("big batch a quarter done", lambda: done_rows(url, big) >= nbig // 4, 180, list(workers.values()))
        for _attempt in range(20):
            held = {h.name: held_rows(url, h.name) for h in cluster.hosts}
            victim = max(cluster.hosts, key=lambda h: len(held[h.name]))
            if held[victim.name]:
                victim.cut()
                t_cut = time.monotonic()
                time.sleep(0.5)  # whatever the victim had on the wire is lost or landed by now
                stranded = held_rows(url, victim.name)
                if stranded:
                    break
                victim.restore()
            time.sleep(0.1)
        else:
            raise AssertionError(f"no host held rows to strand: {held}")
        assert victim is not None
        before_cut = rows_by_host(url)
        print(f"cut {victim.name} {t_cut - t0:.1f}s after submit, holding {len(stranded)} rows; "
              f"rows done per host so far {before_cut}")

        # Its rows come back after ALYA_RECOVERY_SEC, at the next cleanup() of a live worker. An `alya worker`
        # runs cleanup between flow runs, and a flow run lasts while it finds rows to claim: while the live
        # workers are busy with queued rows of their own, the stranded ones wait until they run out (t_idle).
        t_idle: float | None = None

        def recovered() -> bool:
            nonlocal t_idle
            if t_idle is None and not services.sql(url, "SELECT 1 FROM batchrows WHERE status = 'queued' LIMIT 1"):
                t_idle = time.monotonic() - t_cut
            return not (held_rows(url, victim.name) & stranded)

        wait_for("stranded rows recovered", recovered, 120, every=0.1)
        t_back = time.monotonic() - t_cut
        every = list(probes)
        wait_for("all batches final without the victim", lambda: all(
            jm.batch_status(b).status.is_final for b in every), 180, [p for n, p in workers.items()
                                                                       if n != victim.name])
        t_final = time.monotonic() - t_cut
        idle = "never" if t_idle is None else f"{t_idle:.1f}s"
        print(f"stranded rows requeued {t_back:.1f}s after the cut (ALYA_RECOVERY_SEC={RECOVERY_SEC}; the live "
              f"hosts ran out of queued rows: {idle}); all batches final {t_final:.1f}s after the cut")
        # not before the victim's last heartbeat is RECOVERY_SEC old (it beats every RECOVERY_SEC / 4) ...
        assert t_back >= RECOVERY_SEC * 0.7, t_back
        # ... and at the first cleanup after that, or once the live workers are idle (slack: CI load)
        assert t_back <= max(RECOVERY_SEC * 1.25, t_idle or 0.0) + 8, (t_back, t_idle)
        assert victim.is_cut()
        rows_final = row_snapshot(url)
        batches_final = batch_snapshot(url)
        by_host = rows_by_host(url)
        assert sum(by_host.values()) == sum(n for _, n in probes.values())
        stranded_now = {(str(b), ln): d for b, ln, s, d, *_ in rows_final if (str(b), ln) in stranded}
        assert all(d and not d.startswith(f"{victim.name}:") for d in stranded_now.values()), stranded_now
        texts = check_batches(jm, cluster, mhdb, probes)

        # the link returns: the victim's late write-backs land on rows it no longer holds, and change nothing
        log = workers[victim.name].log
        offset = log.stat().st_size
        victim.restore()
        t_restore = time.monotonic()

        def late_answer() -> str | None:
            text = log.read_text(errors="replace")[offset:]
            for event in ("results_discarded", "release_failed", "worker_identity_retired", "flow_failed"):
                if f'"event": "{event}"' in text:
                    return event
            return None

        event = wait_for("the victim's late write-back", late_answer, 150, [workers[victim.name]], every=0.5)
        wait_for("the victim's heartbeat back", lambda: services.sql(
            url, "SELECT 1 FROM workers WHERE host = %s AND lastseen > now() - interval '3 seconds'", victim.name),
            60)
        print(f"link restored; the victim answered late ({event}) {time.monotonic() - t_restore:.1f}s later")
        time.sleep(1.0)
        assert row_snapshot(url) == rows_final
        assert batch_snapshot(url) == batches_final
        assert check_batches(jm, cluster, mhdb, probes) == texts

        # calls: one per row, except that the victim may also have called the rows it was cut off with
        calls, _ = read_journals(cluster, mhdb)
        stranded_lines = {(probes[b][0], ln) for b, ln in stranded}
        others = collections.Counter({(t, ln): 0 for t, n in probes.values() for ln in range(1, n + 1)})
        mine: collections.Counter[tuple[str, int]] = collections.Counter()
        for (tag, line, host), k in calls.items():
            (mine if host == victim.name else others)[(tag, line)] += k
        for row in others:
            if row in stranded_lines:
                assert others[row] == 1 and mine[row] <= 1, (row, others[row], mine[row])
            else:
                assert others[row] + mine[row] == 1, (row, others[row], mine[row])
        print(f"victim made {sum(mine[r] for r in stranded_lines)} calls for its {len(stranded)} stranded rows "
              f"(results discarded); every other row was called exactly once")
    finally:
        if victim is not None and victim.is_cut():
            victim.restore()
        jm.close()
        for w in workers.values():
            w.stop()



def test_prefect_worker_host_cut_off_mid_run(cluster: Cluster, pool: str, mhdb: str, s3_url: str) -> None:
    """A host running a dispatched batch's flow run is cut off. The sweeper (scheduled every minute in
    prefect.yaml; run here once ALYA_RECOVERY_SEC has passed) requeues its rows. Then the batch should finish
    on the other hosts, but today it waits for the lost host: its flow run is still RUNNING in Prefect (a
    process worker's run has no heartbeat Prefect acts on), and the sweeper re-dispatches only batches with
    no live run. The test checks everything else (recovery, exact results, the late write-back changing
    nothing once the link returns and the run finishes the batch) and reports that gap as an expected
    failure; it passes outright once the gap is closed."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    settings = {"ALYA_DISPATCH": "prefect", "ALYA_OBJECT_STORE_URL": s3_url, "ALYA_BATCHCHUNK_NROWS": str(CHUNK),
                "ALYA_WORKER_THREADS": "2", "ALYA_RECOVERY_SEC": str(RECOVERY_SEC)}
    workers = dict(zip((h.name for h in cluster.hosts), start_prefect_workers(cluster, pool, mhdb, settings),
                       strict=True))
    url = cluster.database_url(mhdb)
    victim = None
    with prefect_api(cluster.api_url), get_client_sync() as client:
        wait_online(client, pool, mhdb, list(workers.values()))
        jm = JobManager(database_url=url, redis_url=services.REDIS_URL, object_store_url=s3_url,
                        config=make_config(dispatch="prefect", batchchunk_nrows=CHUNK, recovery_sec=RECOVERY_SEC))
        try:
            n = 300
            bid = submit_probe(jm, "pcut", n, 30)
            probes = {bid: ("pcut", n)}
            t0 = time.monotonic()
            victim = wait_for("the batch's flow run holding rows", lambda: next(
                (h for h in cluster.hosts if held_rows(url, h.name)), None), 120, list(workers.values()), every=0.1)
            victim.cut()
            t_cut = time.monotonic()
            time.sleep(0.5)
            stranded = held_rows(url, victim.name)
            assert stranded
            print(f"cut {victim.name} {t_cut - t0:.1f}s after submit, its flow run holding {len(stranded)} rows")

            time.sleep(max(0.0, RECOVERY_SEC + 1 - (time.monotonic() - t_cut)))
            sweep = client.create_flow_run_from_deployment(client.read_deployment_by_name("alya-sweeper/sweeper").id)
            wait_for("the sweeper's run completed on a live host",
                     lambda: (r := client.read_flow_run(sweep.id)).state is not None and r.state.is_completed(), 120)
            assert not held_rows(url, victim.name) & stranded  # requeued by the sweeper's cleanup()
            print(f"sweeper requeued the stranded rows {time.monotonic() - t_cut:.1f}s after the cut")
            try:
                wait_for("the batch final without the lost host", lambda: jm.batch_status(bid).status.is_final, 30,
                         every=0.5)
                stalled = ""
            except AssertionError:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    tags=FlowRunFilterTags(all_=[f"alya-batch:{bid}"])))
                stalled = (f"batch stalled while {victim.name} was cut off: its rows were requeued, but its flow "
                           f"run stays {[r.state_type.value for r in runs if r.state_type]} in Prefect, so the "
                           "sweeper does not re-dispatch the batch")
                print(stalled)

            victim.restore()
            # Its run goes on (or, had its Prefect calls timed out during the cut, has failed: then the next
            # sweep, every minute in production, re-dispatches the batch; here one is run every 30 s).
            deadline = time.monotonic() + 180
            while not jm.batch_status(bid).status.is_final:
                try:
                    wait_for("the batch final", lambda: jm.batch_status(bid).status.is_final, 30, every=0.5)
                except AssertionError:
                    assert time.monotonic() < deadline, "batch not final 180 s after the link came back"
                    client.create_flow_run_from_deployment(client.read_deployment_by_name("alya-sweeper/sweeper").id)
            print(f"batch final {time.monotonic() - t_cut:.1f}s after the cut")
            runs_of = FlowRunFilter(tags=FlowRunFilterTags(all_=[f"alya-batch:{bid}"]))
            wait_for("no run of the batch left active", lambda: all(
                r.state is not None and r.state.is_final() for r in client.read_flow_runs(flow_run_filter=runs_of)),
                90)
            print("flow runs of the batch:", [r.state_type.value for r in client.read_flow_runs(
                flow_run_filter=runs_of) if r.state_type])
            check_batches(jm, cluster, mhdb, probes)
            rows = row_snapshot(url)
            assert {r[2] for r in rows} == {"success"} and len(rows) == n
            calls, _ = read_journals(cluster, mhdb)
            per_row: collections.Counter[int] = collections.Counter()
            for (_tag, line, _host), k in calls.items():
                per_row[line] += k
            once = {ln for ln in range(1, n + 1) if (bid, ln) not in stranded}
            assert all(per_row[ln] == 1 for ln in once), {ln: per_row[ln] for ln in once if per_row[ln] != 1}
            # a stranded row: its discarded call on the cut-off host, and the one whose result was written
            assert all(1 <= per_row[ln] <= 2 for (_, ln) in stranded)
            assert not stalled, stalled  # the sweeper re-dispatches a batch whose Running run is lost
        finally:
            if victim is not None and victim.is_cut():
                victim.restore()
            jm.close()
            for w in workers.values():
                w.stop()


def get_client_sync() -> Any:
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def read_spans(cluster: Cluster, db: str) -> list[tuple[str, int, int]]:
    """(host, start_ns, end_ns) of every processor call, from every host's journal."""
    spans = []
    for host in cluster.hosts:
        path = journal(cluster, host, db)
        if path.exists():
            for line in path.read_text().splitlines():
                parts = line.split()
                if parts and parts[0] == "span":
                    spans.append((parts[3], int(parts[4]), int(parts[5])))
    return spans


def most_at_once(spans: list[tuple[str, int, int]]) -> int:
    events = sorted([(s, 1) for _, s, _ in spans] + [(e, -1) for _, _, e in spans], key=lambda x: (x[0], x[1]))
    now = most = 0
    for _, d in events:
        now += d
        most = max(most, now)
    return most


def test_an_app_limit_holds_across_hosts(cluster: Cluster, mhdb: str, s3_url: str) -> None:
    """ALYA_APP_LIMITS=mh=4 on three hosts whose workers could run 8 rows each: never more than 4 of the
    app's rows run at once, all hosts together, and the work is still shared between hosts."""
    limit = 4
    url = cluster.database_url(mhdb)
    settings = {"ALYA_OBJECT_STORE_URL": s3_url, "ALYA_CONCURRENCY": "8", "ALYA_APP_LIMITS": f"mh={limit}"}
    workers = [cluster.alya_worker(h, "tests.support.mh_app:jm", mhdb, MH_JOURNAL=str(journal(cluster, h, mhdb)),
                                   **settings) for h in cluster.hosts]
    cluster.wait_workers(mhdb, len(cluster.hosts), procs=workers)
    jm = JobManager(database_url=url, redis_url=services.REDIS_URL, object_store_url=s3_url, config=make_config())
    try:
        n = 120
        bid = submit_probe(jm, "limited", n, 100)
        t0 = time.monotonic()
        wait_for("the limited batch final", lambda: jm.batch_status(bid).status.is_final, 180, workers)
        took = time.monotonic() - t0
        spans = read_spans(cluster, mhdb)
        hosts = {h for h, _, _ in spans}
        print(f"app limit {limit}: {len(spans)} calls on {sorted(hosts)} in {took:.1f}s; "
              f"at most {most_at_once(spans)} at once")
        assert jm.batch_status(bid).nsuccess == n and len(spans) == n
        assert most_at_once(spans) <= limit
        assert len(hosts) >= 2
        assert took >= n * 0.1 / limit * 0.9  # the limit, not the 24 slots, paced the work
    finally:
        jm.close()
        for w in workers:
            w.stop()
