"""The file intake flows of the examples, deployed by ``prefect.yaml`` and ``python -m flows.serve``:

- ``alya-intake``: one pass over ``ALYA_INTAKE_URL``: files matching ``ALYA_INTAKE_PATTERNS``
  (``"*.csv=txn,*.parquet=txn"``) and older than ``ALYA_INTAKE_MIN_AGE_SEC`` become batches, exactly once,
  and move to ``done/<batch_id>/`` or ``failed/``. Scheduled every ``ALYA_INTAKE_EVERY_SEC``; each run
  leaves a table artifact ``alya-intake`` of the files it took.
- ``alya-submit-file``: one file (URL, file type, context) becomes a batch: "run this file" from the UI.

The checkers are those registered on the examples' JobManager (``flows/bank.py`` registers ``txn``);
your own intake flow is the same few lines on your JobManager.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from alya.core import names
from alya.core.errors import ConfigError, InvalidInput
from alya.prefect.intake import intake_dict, intake_pass, submit_file, submitted_state
from alya.prefect.states import refused
from flows import bank
from flows.common import example_jobmanager

jm = example_jobmanager()  # the one flows.bank registered its processor and its file checker on
assert bank.jm is jm


@flow(name=names.INTAKE_FLOW, persist_result=False, log_prints=False, retries=0, validate_parameters=False)
def intake_flow(folder_url: str | None = None, patterns: str | None = None,
                min_age_sec: float | None = None) -> list[dict[str, Any]]:
    """One intake pass; parameters override ALYA_INTAKE_URL, ALYA_INTAKE_PATTERNS, ALYA_INTAKE_MIN_AGE_SEC.
    A setting missing, or a folder outside ALYA_INTAKE_ROOTS, fails the run with one line saying which."""
    try:
        return [intake_dict(fi) for fi in intake_pass(jm.intake, folder_url, patterns, min_age_sec)]
    except (ConfigError, InvalidInput) as exc:
        return refused(exc)  # type: ignore[no-any-return]


@flow(name=names.SUBMIT_FILE_FLOW, persist_result=False, log_prints=False, retries=0, validate_parameters=False)
def submit_file_flow(file_url: str, file_type: str, context: dict[str, Any] | str | None = None) -> dict[str, Any]:
    """The file at ``file_url`` (a path or fsspec URL) becomes a batch, checked by the checker of
    ``file_type``; the file stays where it is. A bad parameter or a rejected file fails the run, with one
    line saying why."""
    try:
        return submitted_state(submit_file(jm.intake, file_url, file_type, context))  # type: ignore[no-any-return]
    except (ConfigError, InvalidInput) as exc:
        return refused(exc)  # type: ignore[no-any-return]
