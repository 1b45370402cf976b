"""Serve every example batch type and the sweeper from one process: ``python -m flows.serve``.

Deployments are named after what they run, as the Dispatcher expects them: ``alya-bank-txn/bank-txn``, ...
(``alya.core.names``); the sweeper ``alya-sweeper/sweeper`` runs every 5 minutes; the file intake
``alya-intake/intake`` every ALYA_INTAKE_EVERY_SEC (when ALYA_INTAKE_URL is set), and
``alya-submit-file/submit-file`` on demand. Each flow run executes in a subprocess of this one, with this
process's environment (set ALYA_DATABASE_URL, ALYA_REDIS_URL, ALYA_OBJECT_STORE_URL, ALYA_DISPATCH, the
ALYA_INTAKE_* settings and PREFECT_API_URL before starting it). Stop with Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Iterable
from typing import Any

from alya.core import names
from flows.common import deployment_of

SWEEPER_EVERY_SEC = 300.0
"""The sweeper's interval: 12 runs an hour. jm.run workers do its recovery work themselves, on leases; for
served or deployed flow runs it bounds how late a lost run's rows are recovered, a batch whose dispatch
failed is dispatched, and a stuck cancellation is forced (prefect.yaml holds the same)."""


def example_deployments(sweeper_interval_sec: float = SWEEPER_EVERY_SEC) -> list[Any]:
    """The RunnerDeployments of the example batch types and the sweeper."""
    from flows import bank, mail, report, sweeper

    deployments = []
    for fl, app, op in ((bank.bank_txn_flow, bank.APP, bank.OP), (mail.mail_send_flow, mail.APP, mail.OP),
                        (report.report_summary_flow, report.APP, report.OP)):
        deployments.append(deployment_of(fl, app, op, tags=names.type_tags(app, op)))
    schedule: dict[str, Any] = {"interval": dt.timedelta(seconds=sweeper_interval_sec)} \
        if sweeper_interval_sec else {}
    deployments.append(deployment_of(sweeper.sweeper_flow, name=names.SWEEPER_DEPLOYMENT,
                                     tags=[names.TAG, "alya-sweeper"], **schedule))
    deployments.extend(intake_deployments())
    return deployments


def intake_deployments() -> list[Any]:
    """``alya-intake/intake``, every ALYA_INTAKE_EVERY_SEC when ALYA_INTAKE_URL and ALYA_INTAKE_PATTERNS are
    set (else unscheduled, with one line saying so: a run needs both), and ``alya-submit-file/submit-file`` (run
    with parameters from the UI)."""
    from alya.core.logs import get_logger
    from alya.core.settings import IntakeSettings
    from flows import intake

    settings = IntakeSettings()
    ready = bool(settings.intake_url and settings.patterns)
    schedule: dict[str, Any] = {"interval": dt.timedelta(seconds=settings.intake_every_sec)} if ready else {}
    if not ready:
        get_logger().info("intake_not_scheduled", deployment=names.intake_deployment(), reason="ALYA_INTAKE_URL and "
                          "ALYA_INTAKE_PATTERNS are not both set: nothing to scan (run it from the UI with parameters)")
    return [deployment_of(intake.intake_flow, name=names.INTAKE_DEPLOYMENT, tags=names.INTAKE_TAGS, **schedule),
            deployment_of(intake.submit_file_flow, name=names.SUBMIT_FILE_DEPLOYMENT, tags=names.INTAKE_TAGS)]


def take_over(deployments: Iterable[Any]) -> list[str]:
    """Delete deployments of the same names that belong to a work pool (made by ``prefect deploy``).

    Serving upserts a deployment by name, but the Prefect server (3.9) then keeps the pool deployment's
    empty ``path`` and the served runs fail to load their flow ("storage at None"); a served deployment
    must be created afresh. Flow runs of the deleted deployments are kept."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from alya.core.logs import get_logger

    taken = []
    with get_client(sync_client=True) as client:
        for dep in deployments:
            name = f"{dep.flow_name}/{dep.name}"
            try:
                existing = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if existing.work_pool_name:
                get_logger().warning("served_deployment_replaces_pool_deployment", deployment=name,
                                     work_pool=existing.work_pool_name)
                client.delete_deployment(existing.id)
                taken.append(name)
    return taken


def serve_all(extra: Iterable[Any] = (), limit: int | None = 4, poll_sec: float = 1.0,
              sweeper_interval_sec: float = SWEEPER_EVERY_SEC) -> None:
    """Serve the examples, the sweeper and ``extra`` deployments until stopped."""
    from prefect import serve

    deployments = [*example_deployments(sweeper_interval_sec), *extra]
    take_over(deployments)
    serve(*deployments, limit=limit, query_seconds=poll_sec)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the alya example deployments and the sweeper.")
    parser.add_argument("--limit", type=int, default=4, help="flow runs at once (each is a process)")
    parser.add_argument("--poll-sec", type=float, default=1.0, help="how often to look for new flow runs")
    parser.add_argument("--sweeper-interval-sec", type=float, default=SWEEPER_EVERY_SEC,
                        help="sweeper schedule; 0 deploys it without a schedule")
    args = parser.parse_args(argv)
    serve_all(limit=args.limit, poll_sec=args.poll_sec, sweeper_interval_sec=args.sweeper_interval_sec)


if __name__ == "__main__":
    main()
