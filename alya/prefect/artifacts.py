"""What a batch-type flow run shows in the Prefect UI: per batch it works on, a progress artifact and, once
the run has summarised it, a summary table; in every mode, a dispatched run (one batch) as a ``jm.run`` /
``alya worker`` run (any batch of its type, many at once).

- **Progress** (key ``<app>-<op>-progress-<batch>``): made when the run first wrote rows of the batch (a dispatched
  run: when it starts), then set once per wave of chunk tasks to the batch's done fraction (its final rows of
  all workers, read from the status read model, not this run's own count), 100 once the batch is final.
- **Summary** (key ``<app>-<op>-summary-<batch>``): a one-row table of the batch's counts, status and output files
  (``BatchSummary.as_row``) for each batch the run summarised, and for a dispatched run's batch whatever its
  state at the end of the run.
- **Overview** (no key, worker runs only): one table of the batches the run wrote rows of or summarised,
  bounded for a long run (``alya.prefect.ledger``): at most ``OVERVIEW_ROWS`` of them, failed and aborted
  first, then a row with the total by status. What the run keeps of a batch goes once the batch has ended.
- **Slow queries** (a run of a slow-query type) get none of the per-batch artifacts above unless
  ``ALYA_ARTIFACTS_SLOW_QUERIES`` is on: each is one request, and a progress and a summary artifact per
  request (1.3 artifacts, 2.4 events and 7 event-resource rows per query in the Prefect server's database)
  cost the server more CPU than the query itself (measured: ~0.9 of a core for ~40 queries/s). The run
  counts them from its chunk reports instead (rows written: each slow query is one row), with no status read
  per query: its overview is one row (answered, success, failed) and its state message says the same.
- **The run's own state message**, while it runs: a dispatched run's Running state says how far its batch
  is ("1,200 of 5,000 rows done, 3 failed"), a worker run's what it did so far ("1,200 rows of 3 batches"),
  at most every ``RUNNING_MESSAGE_SEC`` and the first that long after the start (a short run gets none):
  the run's page shows it under Details, "State Message", without opening an artifact. Prefect has no
  call that changes a state's message, so this proposes a new Running state (not forced) when the run's
  current state is Running: never over a Cancelling one (an abort), never after the batch is final. Each
  such state adds one to the run's ``run_count`` (Prefect counts entries into Running: the UI's "Run
  Count" of a long run grows by about 6 a minute); the batch flows never retry, so nothing reads it.

Each artifact is created with the flow run's id, so it is linked to the run, and only inside a run: outside
one nothing is published. The Prefect calls and status reads run on one helper thread per flow run, so that
a wave of chunk tasks never waits for them (the rows' hot path has none of it); the flow run waits for that
thread at its end, so the final artifacts exist when the run ends. An artifact is a view: a failure is
logged and never stops the run.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

from alya.batch.status import Statuses
from alya.core import names
from alya.core.errors import ProcessorNotFound, describe
from alya.core.logs import get_logger
from alya.core.models import BatchStatus, BatchSummary
from alya.core.registry import Registry
from alya.core.settings import JobManagerConfig
from alya.prefect.ledger import FINISHED_KEPT, Ledger
from alya.prefect.states import queries_message, rows_message

FINISH_WAIT_SEC = 30.0  # the run's end waits this long for its final artifacts
RUNNING_MESSAGE_SEC = 10.0  # a run's Running state message changes at most this often (one state each)


class RunArtifacts:
    """The artifacts of one flow run of batch type (app, op); ``batch_id`` for a dispatched run. Call
    :meth:`wave` with the chunk reports of each wave and :meth:`finish` once, at the end of the run."""

    def __init__(self, statuses: Statuses, app: str, op: str, batch_id: str | None, quiet: bool = False) -> None:
        self.statuses = statuses
        # quiet: slow queries without artifacts of their own (ALYA_ARTIFACTS_SLOW_QUERIES off); only counted
        self.quiet = quiet
        self.queries = [0, 0]  # quiet: slow queries answered, of which failed (the flow's thread only)
        self.app, self.op = app, op
        self.type = f"{app}/{op}"
        self.batch_id = batch_id
        self.log = get_logger().bind(app=app, op=op)
        self.flow_run_id = _flow_run_id()
        # Bounded whatever the run's length (alya.prefect.ledger): a batch's entries go once it has ended
        self.ledger = Ledger()  # the batches the run worked on, counted
        self.progress_ids: dict[str, Any] = {}  # open batch -> its progress artifact (made by this run)
        self.percent: dict[str, tuple[float, str]] = {}  # open batch -> the progress last published
        self.own: BatchSummary | None = None  # a dispatched run's batch, as last read
        self._cond = threading.Condition()
        self._news: set[str] = {batch_id} if batch_id and not quiet else set()  # batches to look at again
        self._counted = False  # quiet: queries were counted since the helper thread last looked
        self._summarised: list[str] | None = None  # set by finish()
        self._done: list[str] = []  # summarised batches whose table is still to be made
        self._tabled: OrderedDict[str, None] = OrderedDict()  # the last FINISHED_KEPT batches this run tabled
        self._thread: threading.Thread | None = None
        # (monotonic time, text) of the last Running message: the first comes RUNNING_MESSAGE_SEC after the
        # start, so a short run (most) gets none and keeps its run_count of 1
        self._message: tuple[float, str] = (time.monotonic(), "")
        # never outside a run (Prefect deprecates it); a dispatched slow query's quiet run has nothing to show
        if self.flow_run_id is not None and not (quiet and batch_id):
            self._thread = threading.Thread(target=self._publish, name=f"alya-artifacts-{app}-{op}", daemon=True)
            self._thread.start()

    def wave(self, reports: list[dict[str, Any]]) -> None:
        """One wave of chunk tasks ended: the batches they wrote rows of (or summarised) get their progress."""
        if self.quiet:  # slow queries: counted, no artifact each (one row each: rows are queries)
            for r in reports:
                self.queries[0] += r["nsuccess"] + r["nfailed"]
                self.queries[1] += r["nfailed"]
            if self._thread is not None and any(r["nsuccess"] or r["nfailed"] for r in reports):
                with self._cond:
                    self._counted = True  # the run's state message follows
                    self._cond.notify()
            return
        news: set[str] = {self.batch_id} if self.batch_id else set()
        done: list[str] = []  # summarised in this wave: their tables now, not at the end of a long run
        for r in reports:
            for batch, n in r["batches"].items():
                if self.ledger.touch(batch, n):
                    news.add(batch)
            for batch in r["summarised"]:
                if self.ledger.touch(batch):
                    news.add(batch)
                done.append(batch)
        if (news or done) and self._thread is not None:
            with self._cond:
                self._news |= news
                self._done.extend(done)
                self._cond.notify()

    def finish(self, summarised: list[str]) -> None:
        """The run ends: progress brought up to date, the summary tables made; waits for them (bounded)."""
        if self._thread is None:
            return
        with self._cond:
            self._summarised = list(dict.fromkeys(summarised))
            self._news |= set(self.ledger.recent_open())  # bounded: END_READS status reads at most
            self._cond.notify()
        self._thread.join(FINISH_WAIT_SEC)
        if self._thread.is_alive():
            self.log.warning("artifacts_late", note=f"still publishing after {FINISH_WAIT_SEC:.0f} s; left to finish")

    # ------------------------------------------------------------------ on the helper thread
    def _publish(self) -> None:
        from prefect.client.orchestration import get_client

        try:
            with get_client(sync_client=True) as client:
                while True:
                    with self._cond:
                        while not self._news and not self._done and self._summarised is None and not self._counted:
                            self._cond.wait()
                        news, self._news = self._news, set()
                        self._counted = False
                        done, self._done = self._done, []
                        summarised = self._summarised
                    for batch in sorted(news):
                        self._progress(client, batch)
                    for batch in self.ledger.overflow():  # too many open: look at the oldest again
                        self._progress(client, batch)
                    for batch in self.ledger.drop_overflow():  # still open: counted as last read
                        self.progress_ids.pop(batch, None)
                        self.percent.pop(batch, None)
                    if summarised is None:
                        self._running_message(client)
                    self._summaries(client, done)
                    if summarised is not None:
                        self._tables(client, summarised)
                        return
        except Exception as exc:  # no client at all (Prefect unreachable): the rows do not care
            self.log.warning("artifacts_failed", error=describe(exc))

    def _progress(self, client: Any, batch: str) -> None:
        """Read the batch's counts and publish its done fraction where it changed."""
        if self.ledger.ended(batch):
            return
        try:
            s = self.statuses.read(batch).value
            if batch == self.batch_id:
                self.own = s
            self._publish_progress(client, batch, s)
        except Exception as exc:
            self.log.debug("progress_artifact_failed", batch=batch, error=describe(exc))
            return
        if s.status is BatchStatus.ABORTED:  # no run summarises an aborted batch: its table comes from here,
            self._summaries(client, [batch])  # after a wave, so once this run's rows of it have settled

    def _publish_progress(self, client: Any, batch: str, s: BatchSummary) -> None:
        """The batch's progress artifact from its summary ``s``: made, or updated where it changed; a final
        one closes the batch's book (its entries here go)."""
        percent, description = progress_of(self.type, batch, s)
        if batch not in self.progress_ids:
            from prefect.client.schemas.actions import ArtifactCreate

            art = client.create_artifact(ArtifactCreate(
                key=names.progress_artifact_key(self.app, self.op, batch), type="progress", data=percent,
                description=description, flow_run_id=self.flow_run_id))
            self.progress_ids[batch] = art.id
        elif (percent, description) != self.percent.get(batch):
            from prefect.client.schemas.actions import ArtifactUpdate

            client.update_artifact(self.progress_ids[batch], ArtifactUpdate(data=percent, description=description))
        self.percent[batch] = (percent, description)
        if self.ledger.read(batch, s):  # ended: counted, and nothing more to publish
            self.progress_ids.pop(batch, None)
            self.percent.pop(batch, None)

    def _running_message(self, client: Any) -> None:
        """The run's Running state, re-proposed with a message saying how far it is (see the module doc)."""
        if self.batch_id is not None:
            s = self.own
            if s is None or s.status.is_final:
                return
            text = running_message(s)
        elif self.quiet:
            if not self.queries[0]:
                return
            text = queries_message(*self.queries)
        else:
            rows, n = self.ledger.rows, self.ledger.nbatches
            if not rows:
                return
            text = f"{rows:,} rows of {n:,} batch{'es' if n != 1 else ''}"
        last_at, last = self._message
        if text == last or time.monotonic() - last_at < RUNNING_MESSAGE_SEC:
            return
        try:
            from prefect.states import Running

            run = client.read_flow_run(self.flow_run_id)
            if run.state is None or run.state.type.value != "RUNNING":  # Cancelling (an abort), or ending
                return
            client.set_flow_run_state(self.flow_run_id, Running(message=text))
            self._message = (time.monotonic(), text)
        except Exception as exc:
            self.log.debug("running_message_failed", error=describe(exc))

    def _tables(self, client: Any, summarised: list[str]) -> None:
        """A keyed summary table per batch summarised (and the dispatched batch); the worker run's overview."""
        from prefect.client.schemas.actions import ArtifactCreate

        if self.quiet:
            if self.queries[0]:
                self._queries_overview(client)
            return
        self._summaries(client, ([self.batch_id] if self.batch_id else []) + summarised)
        if self.batch_id is None and self.ledger.nbatches:
            try:
                rows, description = self.ledger.overview(table_row)
                client.create_artifact(ArtifactCreate(
                    type="table", data=_json_table(rows), flow_run_id=self.flow_run_id,
                    description=f"{self.type}: {description}"))
            except Exception as exc:
                self.log.debug("overview_artifact_failed", error=describe(exc))

    def _queries_overview(self, client: Any) -> None:
        """A quiet slow-query run's overview: one row counting the queries it answered."""
        from prefect.client.schemas.actions import ArtifactCreate

        answered, failed = self.queries
        try:
            client.create_artifact(ArtifactCreate(
                type="table", flow_run_id=self.flow_run_id,
                data=_json_table([{"slow queries answered": answered, "success": answered - failed,
                                   "failed": failed}]),
                description=f"{self.type}: {queries_message(answered, failed)} (no artifact per query: "
                            "ALYA_ARTIFACTS_SLOW_QUERIES is off)"))
        except Exception as exc:
            self.log.debug("overview_artifact_failed", error=describe(exc))

    def _summaries(self, client: Any, batches: list[str]) -> None:
        """A keyed summary table per batch, once per run each (its progress, if open here, brought to its end)."""
        for batch in dict.fromkeys(batches):
            if batch in self._tabled:
                continue
            self._tabled[batch] = None
            if len(self._tabled) > FINISHED_KEPT:
                self._tabled.popitem(last=False)
            try:
                s = self.statuses.read(batch).value
                if batch == self.batch_id:
                    self.own = s
                create_summary(client, self.app, self.op, batch, s, self.flow_run_id)
            except Exception as exc:
                self.log.warning("summary_artifact_failed", batch=batch, error=describe(exc))
                continue
            try:
                if batch in self.progress_ids:  # read before the batch ended: now at its end
                    self._publish_progress(client, batch, s)
                else:
                    self.ledger.read(batch, s)
            except Exception as exc:
                self.log.debug("progress_artifact_failed", batch=batch, error=describe(exc))


def quiet_queries(config: JobManagerConfig, registry: Registry, app: str, op: str) -> bool:
    """Whether a run of (app, op) serves slow queries that get no artifact each (``ALYA_ARTIFACTS_SLOW_QUERIES``
    off). Known from the registration, not per batch: a type is one kind (``Registry.add_processor``) and
    claims take only batches of the registered kind, so a run of a slow-query type serves slow queries alone."""
    if config.artifacts_slow_queries:
        return False
    try:
        return registry.processor(app, op).type == "Q"
    except ProcessorNotFound:  # the run's claims fail on it, and say so
        return False


def create_summary(client: Any, app: str, op: str, batch: str, s: BatchSummary, flow_run_id: Any) -> None:
    """The batch's summary table (key ``<app>-<op>-summary-<batch>``), linked to the flow run ``flow_run_id``:
    by the run itself, or through the API with the id of the run that could not make it (a run cancelled
    before it started, one stopped because it hung)."""
    from prefect.client.schemas.actions import ArtifactCreate

    client.create_artifact(ArtifactCreate(
        key=names.summary_artifact_key(app, op, batch), type="table", data=_json_table([table_row(batch, s)]),
        description=names.batch_artifact_description(app, op, batch, f"{s.status.value}, {rows_message(s)}"),
        flow_run_id=flow_run_id))


def running_message(s: BatchSummary) -> str:
    """ "1,200 of 5,000 rows done, 3 failed": a running batch's final rows of all its rows."""
    done = s.nsuccess + s.nfailed + s.naborted
    text = f"{done:,} of {s.nrows:,} rows done"
    return text + (f", {s.nfailed:,} failed" if s.nfailed else "")


def done_percent(s: BatchSummary) -> float:
    """The share of the batch's rows that are final, in percent (0 for a batch without rows)."""
    if s.nrows <= 0:
        return 0.0
    return min(100.0, round(100.0 * (s.nsuccess + s.nfailed + s.naborted) / s.nrows, 2))


def progress_of(type_: str, batch: str, s: BatchSummary) -> tuple[float, str]:
    """A progress artifact's value and description: the share of rows done and what the batch is. An
    aborted batch stops at the share of its rows that ran (success or failed), never 100 %."""
    head = f"{type_} batch {batch}"
    if s.status is BatchStatus.ABORTED:
        ran = 0.0 if s.nrows <= 0 else round(100.0 * (s.nsuccess + s.nfailed) / s.nrows, 2)
        return ran, f"{head}: aborted, {rows_message(s)}"
    if s.status.is_final:
        return 100.0, f"{head}: {s.status.value}, {rows_message(s)}"
    return done_percent(s), f"{head}: {s.status.value}, {rows_message(s)}"


FIRST_COLUMNS = ("status", "nrows", "nsuccess", "nfailed", "naborted", "nqueued", "ninprog")


def table_row(batch: str, s: BatchSummary) -> dict[str, Any]:
    """A row of a summary table: the batch, its status and counts (what the UI must show without scrolling
    sideways), then every other field of its summary as a cell, the long output file URLs last."""
    row = s.as_row()
    order = [*FIRST_COLUMNS, *(k for k in row if k not in FIRST_COLUMNS and k != "outputfiles"), "outputfiles"]
    return {"batch": batch, **{k: _cell(row[k]) for k in order if k in row}}


def _cell(value: Any) -> Any:
    """A table cell of the Prefect UI: output files as their URLs, nothing as an empty cell."""
    if isinstance(value, dict):
        return ", ".join(map(str, value.values()))
    return "" if value is None else value


def _json_table(rows: list[dict[str, Any]]) -> str:
    import json

    return json.dumps(rows, default=str)


def _flow_run_id() -> Any:
    """The id of the flow run this code runs in, or None outside one."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return ctx.flow_run.id if ctx is not None and ctx.flow_run is not None else None
