"""Every name alya gives to something outside Python, in one place: Redis keys, PostgreSQL channels,
Prefect flows, deployments, flow-run tags and names, artifact keys, object-store paths.

Two processes that must agree on a name (a client that caches a summary and a worker that invalidates it,
a dispatcher that creates a flow run and a deployment that serves it) both call the function here, so a
name can never drift between them.
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------------------- Redis
# Every key of a batch carries the batch id as a Redis Cluster hash tag ({...}), so all of one batch's keys
# live in one slot. Values are JSON with a "ver" field (see alya.io.cache); any key may be deleted at any time.


def summary_key(batch_id: str) -> str:
    """The batch's summary (status, counts, output files): what batch_status / batch_done read first."""
    return f"alya:{{{batch_id}}}:summary"


def done_key(batch_id: str) -> str:
    """Every row of a small final batch (batch_done's rows), so repeated polls skip PostgreSQL."""
    return f"alya:{{{batch_id}}}:done"


# ---------------------------------------------------------------------------- PostgreSQL
WORK_CHANNEL = "alya_work"
"""LISTEN/NOTIFY channel: a commit that makes rows claimable notifies it with the payload ``app/op``."""


def work_payload(app: str, op: str) -> str:
    return f"{app}/{op}"


ANY_WORK_PAYLOAD = "*"
"""Sent on WORK_CHANNEL when rows of any type may have become claimable (recovery requeued rows)."""


COUNTS_TABLE = "batch_counts"
"""Rows of each batch by status, kept by triggers on ``batchrows`` (migration 0011): one row per batch and
*shard* (the PostgreSQL backend that wrote it), summed on read. See ``alya.db.counters``."""
COUNTS_TRIGGERS = {
    "UPDATE": ("alya_count_updated", "alya_counts_update"),
    "DELETE": ("alya_count_deleted", "alya_counts_delete"),
}
"""Statement-level triggers on ``batchrows`` that move the counters: event -> (function, trigger). Inserts
are counted by the statements that insert (``alya.db.batches``): see migration 0011."""
COUNTS_TRUNCATE = ("alya_count_truncated", "alya_counts_truncate")
COUNTS_BATCH_GONE = ("alya_count_batch_gone", "alya_counts_batch_gone")
"""A deleted batch takes its counter rows with it (trigger on ``batches``)."""


ROWS_TABLE = "batchrows"
"""Partitioned by range of ``batch`` (UUIDv7, time-ordered: migration 0012, ``alya.db.partitions``)."""
ROWS_DEFAULT = "batchrows_default"
"""The DEFAULT partition: the table of rows as it was before migration 0012 (random v4 ids), and rows of
any id no range partition covers (a period not created yet, or one already dropped)."""
_ROWS_PARTITION = re.compile(r"^batchrows_w(\d{8})$")
PARTITION_FUNCTIONS = ("alya_partition_create", "alya_partition_detach", "alya_partition_discard")
"""Server-side functions of migration 0012 that create, detach and drop a range partition (DDL naming it)."""


def rows_partition(start: str) -> str:
    """The range partition of the period starting on ``start`` (``YYYYMMDD``, a Monday, UTC)."""
    return f"batchrows_w{start}"


def is_rows_partition(name: str) -> bool:
    """A partition of ``batchrows`` (a range one or the default), e.g. to leave out of schema comparisons."""
    return name == ROWS_DEFAULT or _ROWS_PARTITION.match(name) is not None


def parent_constraint(name: str) -> str:
    """A partition's constraint or index (``batchrows_w20261130_pkey``, ``batchrows_default_queued``) as
    its parent's (``batchrows_pkey``); any other name as it is."""
    return _PARTITION_PART.sub("batchrows_", name)


_PARTITION_PART = re.compile(r"^batchrows_(?:w\d{8}|default)_")


ABORT_PREFIX = "abort:"


def abort_payload(batch_id: str) -> str:
    """Sent on WORK_CHANNEL by an abort: workers stop starting the batch's rows at once, not at their next
    flush (so at most the rows already running are done but recorded aborted)."""
    return f"{ABORT_PREFIX}{batch_id}"


PAUSE_PREFIX = "pause:"
RESUME_PREFIX = "resume:"


def pause_payload(batch_id: str) -> str:
    """Sent on WORK_CHANNEL by ``batch_pause``: workers stop starting the batch's rows at once and give back
    the unstarted ones they hold (``alya.engine.engine``)."""
    return f"{PAUSE_PREFIX}{batch_id}"


def resume_payload(batch_id: str) -> str:
    """Sent on WORK_CHANNEL by ``batch_resume`` (with the type's work payload, which wakes idle workers)."""
    return f"{RESUME_PREFIX}{batch_id}"


# ---------------------------------------------------------------------------- Prefect
SWEEPER_FLOW = "alya-sweeper"
DEFAULT_DEPLOYMENT = "{app}-{op}"  # ALYA_DEPLOYMENT_NAME's default: a batch type's deployment reads bank-txn
TAG = "alya"  # every flow run and deployment alya makes carries it
SWEEPER_DEPLOYMENT = "sweeper"
"""The sweeper's deployment: ``alya-sweeper/sweeper``."""


def sanitize(text: str) -> str:
    """``text`` as Prefect allows an artifact key (and as reads well in a deployment name): lower-case
    letters, digits and single dashes, no dash at either end. Deterministic, so a key made from the same
    batch is found again; different inputs may meet (``a_b`` and ``a.b``), so every key built here also
    carries the batch id (a UUID: already in this alphabet), which keeps it unique per batch."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", text.lower())).strip("-") or "x"


def flow_name(app: str, op: str) -> str:
    """The Prefect flow of batch type (app, op): each batch type is one flow."""
    return f"alya-{app}-{op}".replace("_", "-").replace(".", "-")


def type_deployment(app: str, op: str, template: str = DEFAULT_DEPLOYMENT) -> str:
    """The deployment's own name (after the ``/``): ``template`` (ALYA_DEPLOYMENT_NAME) with ``{app}`` and
    ``{op}`` filled in, so by default the batch type itself (``bank-txn``): lists and breadcrumbs of the
    Prefect UI then say which type a deployment serves. A template without placeholders (``alya``, the old
    default) names every deployment alike."""
    return sanitize(template.replace("{app}", app).replace("{op}", op))


def deployment_name(app: str, op: str, deployment: str = DEFAULT_DEPLOYMENT) -> str:
    """``{flow}/{deployment}``: the full name the dispatcher looks up and ``prefect.yaml`` declares
    (``alya-bank-txn/bank-txn``); ``deployment`` is ALYA_DEPLOYMENT_NAME (a template, see above)."""
    return f"{flow_name(app, op)}/{type_deployment(app, op, deployment)}"


def sweeper_deployment() -> str:
    return f"{SWEEPER_FLOW}/{SWEEPER_DEPLOYMENT}"


def batch_tag(batch_id: str) -> str:
    """The tag that finds a batch's flow runs (to cancel them on abort, or see that one is live)."""
    return f"alya-batch:{batch_id}"


def batch_of_tag(tag: str) -> str | None:
    prefix = "alya-batch:"
    return tag[len(prefix):] if tag.startswith(prefix) else None


def type_tags(app: str, op: str) -> list[str]:
    """Tags of a batch type's deployments and runs (filter by app or op in the Prefect UI)."""
    return [TAG, f"alya-app:{app}", f"alya-op:{op}"]


def run_tags(app: str, op: str, batch_id: str) -> list[str]:
    return [*type_tags(app, op), batch_tag(batch_id)]


def run_name(app: str, op: str, batch_id: str, part: int = 0) -> str:
    """``part``: the rank of one of a batch's dispatched runs (the first has none)."""
    return f"{app}-{op}-{batch_id}" + (f"-{part + 1}" if part else "")


def dispatch_key(batch_id: str, event: str) -> str:
    """Idempotency key of a flow run created for ``event`` (release, release:<rank> for a batch's further runs,
    continue:<run>, sweep:<minute>)."""
    return f"alya:{batch_id}:{event}"


def retry_key(batch_id: str, round: int) -> str:
    """Idempotency key of the flow run created for a retried batch's round (a new run per round)."""
    return dispatch_key(batch_id, f"retry:{round}")


def progress_artifact_key(app: str, op: str, batch_id: str) -> str:
    """``bank-txn-progress-<batch>``: the batch type first, so a key in the Artifacts page says what it is;
    the batch id keeps it unique per batch. Sanitized (Prefect allows lower-case letters, digits, dashes)."""
    return sanitize(f"{app}-{op}-progress-{batch_id}")


def summary_artifact_key(app: str, op: str, batch_id: str) -> str:
    """``bank-txn-summary-<batch>`` (see :func:`progress_artifact_key`)."""
    return sanitize(f"{app}-{op}-summary-{batch_id}")


def batch_artifact_description(app: str, op: str, batch_id: str, what: str) -> str:
    """An artifact's description: the batch type and batch, then what it shows."""
    return f"{app}/{op} batch {batch_id}: {what}"


# ---------------------------------------------------------------------------- object store


def batch_prefix(root_url: str, app: str, op: str, batch_id: str) -> str:
    """Where a batch's output files go: ``{root}/{app}/{op}/{batch}/{file}``."""
    return f"{root_url.rstrip('/')}/{app}/{op}/{batch_id}"


# ---------------------------------------------------------------------------- file intake
INTAKE_FLOW = "alya-intake"
"""The scheduled flow that runs one intake pass over ALYA_INTAKE_URL (deployment ``alya-intake/intake``)."""
SUBMIT_FILE_FLOW = "alya-submit-file"
"""The flow that makes one file (URL, file type, context) a batch: run it from the Prefect UI."""
INTAKE_DEPLOYMENT = "intake"
SUBMIT_FILE_DEPLOYMENT = "submit-file"
INTAKE_ARTIFACT_KEY = "alya-intake"
"""The table artifact of the files one intake run took (one version per run that took or refused a file)."""
INTAKE_TAGS = [TAG, "alya-intake"]


def intake_deployment() -> str:
    return f"{INTAKE_FLOW}/{INTAKE_DEPLOYMENT}"


def submit_file_deployment() -> str:
    return f"{SUBMIT_FILE_FLOW}/{SUBMIT_FILE_DEPLOYMENT}"


def file_artifact_key(file_name: str) -> str:
    """``alya-file-<name>``: the table of what ``alya-submit-file`` did with a file, one version per run of
    the same file name, so a file submitted again shows under the same key (and says it was a repeat)."""
    return sanitize(f"alya-file-{file_name}")


DONE_FOLDER = "done"
FAILED_FOLDER = "failed"


def intake_done_url(folder_url: str, batch_id: str, name: str) -> str:
    """Where a submitted file goes: ``<folder>/done/<batch_id>/<name>``."""
    return f"{folder_url.rstrip('/')}/{DONE_FOLDER}/{batch_id}/{name}"


def intake_failed_url(folder_url: str, name: str) -> str:
    """Where a rejected file goes: ``<folder>/failed/<name>``."""
    return f"{folder_url.rstrip('/')}/{FAILED_FOLDER}/{name}"


# ---------------------------------------------------------------------------- Prefect events
EVENT_LABEL_APP = "alya.app"
EVENT_LABEL_OP = "alya.op"
EVENT_LABEL_KIND = "alya.kind"  # "batch" or "slowquery"


def batch_event_name(status: str) -> str:
    """The Prefect event of a batch status change: ``alya.batch.queued`` ... ``alya.batch.aborted``."""
    return f"alya.batch.{status}"


def batch_resource_id(batch_id: str) -> str:
    """The resource id of a batch's events (``prefect.resource.id``)."""
    return f"alya.batch.{batch_id}"
