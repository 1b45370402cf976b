"""The Prefect side of the file intake: the bodies of the flows ``alya-intake`` (one scheduled pass over
``ALYA_INTAKE_URL``) and ``alya-submit-file`` (one file becomes a batch, run from the Prefect UI), and the
table artifact that shows in the UI which files a run took.

The flows themselves are module-level ``@flow`` functions of the application (``flows/intake.py`` for the
examples), because Prefect loads a deployment's flow by import path and the checkers must be registered on
the application's JobManager; they call these functions with ``jm.intake``.

Their parameters come from whoever can run a flow (an open-source Prefect server has no login): a folder or
file URL they name must lie under ``ALYA_INTAKE_ROOTS`` (default: ``ALYA_INTAKE_URL`` alone; nothing when
that is unset), checked before anything is read or fetched (``alya.core.confine``).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from alya.batch.intake import Intake
from alya.core import names, validate
from alya.core.confine import Roots
from alya.core.errors import ConfigError, InvalidInput, describe
from alya.core.logs import get_logger
from alya.core.models import FileIntake
from alya.core.redact import shown_url
from alya.core.settings import IntakeSettings


def intake_pass(intake: Intake, folder_url: str | None = None, patterns: dict[str, str] | str | None = None,
                min_age_sec: float | None = None) -> list[FileIntake]:
    """One pass with the ALYA_INTAKE_* settings (arguments win), publishing the files taken as a table
    artifact when run inside a flow. An unset folder or pattern list is a ConfigError naming the variable."""
    settings = IntakeSettings()  # type: ignore[call-arg]  # the fields come from ALYA_INTAKE_*
    folder = folder_url or settings.intake_url
    if not folder:
        raise ConfigError("ALYA_INTAKE_URL is not set: the folder the intake scans (a path or fsspec URL)")
    pats = patterns or settings.patterns
    if not pats:
        raise ConfigError('ALYA_INTAKE_PATTERNS is not set: GLOB=FILETYPE,... e.g. "*.csv=txn,*.parquet=txn"')
    min_age = settings.intake_min_age_sec if min_age_sec is None else min_age_sec
    taken = intake.scan(folder, pats, min_age, roots=flow_roots(settings))
    if taken:  # a pass that took nothing leaves no artifact: an empty table every minute buries the rest
        publish_artifact(names.INTAKE_ARTIFACT_KEY, taken,
                         f"{shown_url(folder)}: {', '.join(_took(fi) for fi in taken)}")
    return taken


def submit_file(intake: Intake, file_url: Any, file_type: Any, context: Any = None) -> FileIntake:
    """The body of ``alya-submit-file``: parameters checked first, each bad one a one-line InvalidInput;
    a rejected file fails the run with its reason (the rejection is recorded all the same)."""
    if not isinstance(file_url, str) or not file_url.strip():
        raise InvalidInput(f"file_url must be the path or fsspec URL of a file, got {file_url!r}")
    ftype = validate.file_type(file_type)
    ctx = validate.json_object(context if context not in (None, "") else {}, "context", intake.max_context_bytes)
    settings = IntakeSettings()  # type: ignore[call-arg]  # the fields come from ALYA_INTAKE_*
    fi = intake.file_submit(file_url.strip(), ftype, ctx, roots=flow_roots(settings))
    name = file_name_of(fi)
    publish_artifact(names.file_artifact_key(name), [fi], f"{shown_url(file_url)} as file type {ftype}: {_took(fi)}")
    if fi.status != "submitted":
        again = " (the same file again: rejected when first taken)" if fi.repeat else ""
        raise InvalidInput(f"{shown_url(file_url)} was rejected{again}: {fi.error}")
    return fi


def file_name_of(fi: FileIntake) -> str:
    """The file's own name (where it was found), for keys and descriptions a person reads."""
    return (fi.source or fi.url).rstrip("/").rsplit("/", 1)[-1]


def _took(fi: FileIntake) -> str:
    """ "in.csv: batch X (5 rows)", "in.csv: rejected (why)", "in.csv: already taken as batch X"."""
    what = f"batch {fi.batch_id} ({fi.nrows:,} rows)" if fi.batch_id else f"rejected ({fi.error})"
    if fi.repeat:
        what = f"already taken as batch {fi.batch_id}" if fi.batch_id else f"already taken and {what}"
    return f"{file_name_of(fi)}: {what}"


def submitted_state(fi: FileIntake) -> Any:
    """The state an ``alya-submit-file`` run ends in: Completed, its message saying what became of the
    file ("in.csv: already taken as batch X" for the same file again), the FileIntake as its data."""
    from prefect.states import Completed

    return Completed(message=_took(fi), data=intake_dict(fi))


def flow_roots(settings: IntakeSettings) -> Roots:
    """What confines a flow's URLs: ALYA_INTAKE_ROOTS, else ALYA_INTAKE_URL alone, else nothing at all."""
    return Roots(settings.roots, "ALYA_INTAKE_ROOTS" if settings.intake_roots is not None else
                 "ALYA_INTAKE_ROOTS (unset, so ALYA_INTAKE_URL)")


def intake_dict(fi: FileIntake) -> dict[str, Any]:
    """A FileIntake as JSON-ready values (a flow's result)."""
    d = asdict(fi)
    d["reqat"] = fi.reqat.isoformat()
    return d


def publish_artifact(key: str, files: list[FileIntake], description: str) -> None:
    """A table artifact of ``files`` in the current flow run (nothing outside a run; never raises)."""
    try:
        from prefect.artifacts import create_table_artifact
        from prefect.context import FlowRunContext

        if FlowRunContext.get() is None:
            return
        table = [{"file": file_name_of(fi), "type": fi.filetype,
                  "status": f"{fi.status} (repeat)" if fi.repeat else fi.status,
                  "batch": fi.batch_id or "", "rows": fi.nrows, "error": fi.error or "", "now at": fi.url}
                 for fi in files]
        create_table_artifact(table=table, key=key, description=description)
    except Exception as exc:  # an artifact is a view: the files are taken whatever happens to it
        get_logger().warning("intake_artifact_failed", error=describe(exc))
