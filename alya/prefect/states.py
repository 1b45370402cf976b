"""The final state of a batch-type flow run: what the runs list of the Prefect UI says at a glance.

- A **dispatched run** (``ALYA_DISPATCH=prefect``: one run per batch) ends in the state of its batch:
  ``success`` → *Completed* ("5,000 of 5,000 rows"), ``failed`` → *Failed* ("4,949 of 5,000 rows, 51
  failed"), ``aborted`` → *Cancelled* named *Aborted* ("1,200 of 5,000 rows, 3,800 aborted"), also when the
  abort came while the run was processing: the run sees its batch aborted and ends so itself. A run that
  ends with its batch still open (it used its task budget and handed over to a fresh run, or its worker
  stopped) is *Completed* with a message saying so. A big batch gets several dispatched runs
  (``ALYA_DISPATCH_MAX_RUNS``): only the run that summarised it ends in its outcome; the others end
  *Completed*, "batch failed: 4,949 of 5,000 rows, 51 failed; summarised by another run", so the runs list
  shows a failed batch once, not once per machine that helped. An aborted batch ends every run that served
  it *Aborted* (each was stopped by the abort).
- A **worker run** (``jm.run`` / ``alya worker``: one run serves many batches of its type) is *Completed*
  unless it crashed, with a message counting the batches it worked on by their status at its end ("12
  batches: 10 success, 1 failed, 1 aborted"). *Decided:* a worker run is not *Failed* for one bad batch:
  Prefect would retry it or fire failure automations for a healthy worker, and the other batches it served
  did well. Each batch's own outcome is its summary artifact (``alya.prefect.artifacts``).

The run's body (:func:`alya.prefect.flows.run_batch`) returns its counts with a JSON-friendly ``state``
entry made here; :func:`alya.prefect.flows.batch_flow` turns it into the Prefect state the flow returns.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

from alya.core.models import BatchStatus, BatchSummary

ABORTED_NAME = "Aborted"
STATE_KEY = "state"  # the entry of a run's result that holds the state to end in


def rows_message(s: BatchSummary) -> str:
    """ "4,949 of 5,000 rows, 51 failed": rows that succeeded of the batch's rows, then the others."""
    parts = [f"{s.nsuccess:,} of {s.nrows:,} rows"]
    parts += [f"{n:,} {what}" for n, what in ((s.nfailed, "failed"), (s.naborted, "aborted"),
                                              (s.nqueued + s.ninprog, "open")) if n]
    return ", ".join(parts)


def batch_state(s: BatchSummary, handed_over: bool = False, summarised: bool = True) -> dict[str, Any]:
    """The state of a run that served one batch, whose summary at the run's end is ``s``. ``summarised``:
    this run ended the batch (wrote its summary); a run that only helped does not repeat its outcome."""
    message = rows_message(s)
    if s.status in (BatchStatus.SUCCESS, BatchStatus.FAILED) and not summarised:
        return {"type": "COMPLETED", "name": "Completed",
                "message": f"batch {s.status.value}: {message}; summarised by another run"}
    if s.status is BatchStatus.SUCCESS:
        return {"type": "COMPLETED", "name": "Completed", "message": message}
    if s.status is BatchStatus.FAILED:
        return {"type": "FAILED", "name": "Failed", "message": message + (f"; {s.error}" if s.error else "")}
    if s.status is BatchStatus.ABORTED:
        return {"type": "CANCELLED", "name": ABORTED_NAME, "message": message}
    why = "paused" if s.paused else "handed over to a fresh run" if handed_over else "left to other runs"
    return {"type": "COMPLETED", "name": "Completed", "message": f"batch {s.status.value}: {message}; {why}"}


def worker_state(counts: Mapping[str, int]) -> dict[str, Any]:
    """The state of a run that served any batch of its type: Completed, counting its batches by status
    (``counts``: status value, or ``unknown`` for a batch whose status could not be read, to batches)."""
    n = sum(counts.values())
    if not n:
        return {"type": "COMPLETED", "name": "Completed", "message": "no batch to work on"}
    return {"type": "COMPLETED", "name": "Completed",
            "message": f"{n:,} batch{'es' if n != 1 else ''}: {status_counts(counts)}"}


STATUS_ORDER = [s.value for s in (BatchStatus.SUCCESS, BatchStatus.FAILED, BatchStatus.ABORTED, BatchStatus.INPROG,
                                  BatchStatus.QUEUED, BatchStatus.WAIT)] + ["unknown"]


def status_counts(counts: Mapping[str, int]) -> str:
    """ "10 success, 1 failed, 1 aborted": batches by status, in a fixed order."""
    return ", ".join(f"{counts[k]:,} {k}" for k in STATUS_ORDER if counts.get(k))


def queries_state(answered: int, failed: int) -> dict[str, Any]:
    """The state of a worker run of a slow-query type whose queries get no artifacts of their own
    (``ALYA_ARTIFACTS_SLOW_QUERIES`` off): Completed, with how many it answered and how many failed, counted
    from its chunk reports (no status read per query)."""
    return {"type": "COMPLETED", "name": "Completed", "message": queries_message(answered, failed)}


def queries_message(answered: int, failed: int) -> str:
    """ "1,200 slow queries answered: 1,197 success, 3 failed" (or "no slow query answered")."""
    if not answered:
        return "no slow query answered"
    return (f"{answered:,} slow quer{'ies' if answered != 1 else 'y'} answered: "
            f"{answered - failed:,} success, {failed:,} failed")


def to_prefect(result: Any) -> Any:
    """A run's result as the Prefect state the flow returns: the ``state`` entry made above, with the whole
    result as a Completed state's data. Anything else is returned as it is (Prefect makes it Completed)."""
    if not isinstance(result, dict) or not isinstance(result.get(STATE_KEY), dict):
        return result
    from prefect.states import Cancelled, Completed, Failed

    spec = result[STATE_KEY]
    kind, message = spec.get("type"), spec.get("message")
    if kind not in ("FAILED", "CANCELLED"):
        return Completed(name=spec.get("name") or None, message=message, data=result)
    # A Failed or Cancelled state carries no data: Prefect raises its message as FailedRun / CancelledRun
    # where the run's result is asked for (a dict there would be a TypeError instead)
    chosen_messages.append(message)
    return (Failed if kind == "FAILED" else Cancelled)(name=spec.get("name") or None, message=message)


def refused(exc: Exception) -> Any:
    """The state of a run that could not start its work because of a setting or a parameter (a
    ``ConfigError``, an ``InvalidInput``): Failed with the reason as its one line, no traceback."""
    from prefect.states import Failed

    message = str(exc)
    chosen_messages.append(message)
    return Failed(message=message)


chosen_messages: deque[str | None] = deque(maxlen=100)
"""Messages of the Failed and Cancelled states alya's flows returned in this process, for
:class:`alya.prefect.logging.OwnOutcomeFilter`."""
