"""Example slow query ``report/summary`` (ported from Alya's report example): a summary of one app's
batches over a date range, read from the alya database.

Input ``{"app": "bank", "from": "2024-01-01", "to": "2024-12-31"}``. Bad input is a business failure:
status ``failed`` with one ``ErrorMessage`` per problem, naming the field and the offending values.
Otherwise the result is ``{"app", "from", "to", "batches", "rows", "by_status": {status: n}}``.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import Any

from sqlalchemy import text

from alya import BatchStatus, ErrorMessage, JobManager, SlowQueryResult, batch_flow
from flows.common import DbBlock, LoggingDone, example_jobmanager, first_registration

APP, OP = "report", "summary"
APP_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_DAYS = 366


class ReportInitializer:
    """``database_url`` may be a function: importing the module then starts nothing (see flows.bank)."""

    def __init__(self, database_url: str | Callable[[], str]) -> None:
        self.database_url = database_url

    def init(self, app: str) -> DbBlock:
        return DbBlock(self.database_url if isinstance(self.database_url, str) else self.database_url())


def check_input(input: dict[str, Any]) -> tuple[list[ErrorMessage], dict[str, Any]]:
    """The messages for bad input (empty when it is good), and the parsed values."""
    messages: list[ErrorMessage] = []
    app = input.get("app")
    if not isinstance(app, str) or not APP_NAME.match(app):
        messages.append(ErrorMessage(msgid=20, errcode="invalid_app", field="app", vals=[str(app)]))
    dates: dict[str, dt.date] = {}
    for field in ("from", "to"):
        raw = input.get(field)
        if raw is None:
            messages.append(ErrorMessage(msgid=21, errcode="missing", field=field))
            continue
        try:
            dates[field] = dt.date.fromisoformat(str(raw))
        except ValueError:
            messages.append(ErrorMessage(msgid=22, errcode="invalid_date", field=field, vals=[str(raw)]))
    if len(dates) == 2:
        if dates["from"] > dates["to"]:
            messages.append(ErrorMessage(msgid=23, errcode="bad_range", field="to",
                                         vals=[dates["from"].isoformat(), dates["to"].isoformat()]))
        elif (dates["to"] - dates["from"]).days > MAX_DAYS:
            messages.append(ErrorMessage(msgid=24, errcode="range_too_long", field="to",
                                         vals=[str((dates["to"] - dates["from"]).days), str(MAX_DAYS)]))
    return messages, {"app": app, **dates}


class ReportSummaryProcessor(LoggingDone):
    def do_slow_query(self, initblock: DbBlock, context: dict[str, Any],
                      input: dict[str, Any]) -> SlowQueryResult:
        messages, args = check_input(input)
        if messages:
            return SlowQueryResult(status=BatchStatus.FAILED, messages=messages)
        with initblock.engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT status::text, count(*), coalesce(sum(nrows), 0) FROM batches "
                "WHERE app = :app AND type = 'B' AND reqat >= :start AND reqat < :end GROUP BY status"),
                {"app": args["app"], "start": args["from"], "end": args["to"] + dt.timedelta(days=1)}).all()
        by_status = {status: int(n) for status, n, _ in rows}
        return SlowQueryResult(status=BatchStatus.SUCCESS, result={
            "app": args["app"], "from": args["from"].isoformat(), "to": args["to"].isoformat(),
            "batches": sum(by_status.values()), "rows": sum(int(r) for _, _, r in rows),
            "by_status": by_status,
        })


def register(jm: JobManager) -> None:
    if not first_registration(jm, APP):
        return
    jm.register_initializer(APP, ReportInitializer(lambda: jm.store.database_url))
    jm.register_slowquery_processor(APP, OP, ReportSummaryProcessor())


jm = example_jobmanager()
register(jm)


@batch_flow(APP, OP)
def report_summary_flow(batch_id: str | None = None) -> dict[str, Any]:
    """Example slow query report/summary: one app's batches over a date range.

    A deployment's run works on batch ``batch_id``; without one, on every queued batch of the type."""
    return jm.process_batches(APP, OP, batch_id)
