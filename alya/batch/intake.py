"""File intake (Alya's ``filexfr`` / ``infiled``): a file of rows becomes one batch, exactly once.

A **file checker** registered per file type reads an :class:`~alya.io.files.IncomingFile` and returns a
:class:`~alya.core.models.FileCheck`: rejected, or good as a batch of (app, op) with a context and rows.

Exactly once, also with scans running at once on several machines: a file (URL, size, version) is claimed
in PostgreSQL before it is read. One transaction takes a transaction-scoped advisory lock on the file's URL
(a scan that finds it held leaves the file to whoever holds it; ``file_submit`` waits), looks for the file's
record in ``batch_files``, and only if there is none calls the checker, copies the rows into a new batch and
inserts the record; batch and record commit together. The move to ``done/<batch_id>/`` or ``failed/``
happens after the commit: a crash in between leaves a record whose file is still in the folder, and the next
pass only completes the move. A rejected file (the checker says no or raises, a row is invalid, the file
cannot be parsed) is recorded in the same way, with its reason and no batch: the batch's insert runs in a
savepoint that is rolled back.

A file that cannot be *read* (its store unreachable, or gone meanwhile) is not rejected: nothing is recorded
and a later pass tries again. A failure of PostgreSQL raises, and nothing is stored.
"""

from __future__ import annotations

import fnmatch
import math
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import chain
from typing import Any

from alya.core import validate
from alya.core.confine import Roots
from alya.core.errors import BackendUnavailable, InvalidInput, ProcessorNotFound, describe
from alya.core.logs import get_logger, status_change
from alya.core.models import BatchStatus, FileCheck, FileIntake
from alya.core.records import FileRecord
from alya.core.redact import redact_text, shown_url, stored_url
from alya.db.batches import NewBatch, insert_batch
from alya.db.ingest import iter_rows
from alya.db.queries import Queries
from alya.db.store import Store
from alya.io.files import FileChecker, FileInfo, Folder, IncomingFile, stat
from alya.io.readers import frames_to_inputs

SUBMITTED, REJECTED = "submitted", "rejected"
MAX_ERROR_CHARS = 2000


class FileCheckers:
    """The file checkers registered in this process, one per file type."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._checkers: dict[str, FileChecker] = {}

    def add(self, filetype: str, checker: FileChecker) -> None:
        ftype = validate.file_type(filetype)
        if not callable(getattr(checker, "check", None)):
            raise InvalidInput("a file checker needs a check(file, context) method")
        with self._lock:
            if ftype in self._checkers:
                raise InvalidInput(f"a file checker is already registered for file type {ftype!r}")
            self._checkers[ftype] = checker

    def get(self, filetype: str) -> FileChecker:
        ftype = validate.file_type(filetype)
        checker = self._checkers.get(ftype)
        if checker is None:
            known = ", ".join(sorted(self._checkers)) or "none"
            raise ProcessorNotFound(f"no file checker registered for file type {ftype!r} (registered: {known})")
        return checker


class Intake:
    """The file intake of one JobManager: its checkers, and the store its batches and records go to.

    ``on_batch`` is called after each commit that stored a batch (the facade caches its summary and
    dispatches a flow run); it must not raise. ``storage_options`` gives the fsspec options for a URL
    (the JobManager's, when the URL is on its object store's bucket or host). ``roots`` (ALYA_INTAKE_ROOTS,
    when set) confine every URL this intake reads; the intake flows pass their own to each call."""

    def __init__(self, store: Store, batchrowmax: int, on_batch: Callable[[NewBatch], None],
                 storage_options: Callable[[str], dict[str, Any]] | None = None, roots: Roots | None = None,
                 read_limits: dict[str, int] | None = None, max_context_bytes: int | None = None,
                 max_input_bytes: int | None = None) -> None:
        self.store = store
        self.batchrowmax = batchrowmax
        self.on_batch = on_batch
        self.options_for = storage_options or (lambda url: {})
        self.roots = roots
        self.read_limits = dict(read_limits or {})
        self.max_context_bytes, self.max_input_bytes = max_context_bytes, max_input_bytes
        self.checkers = FileCheckers()

    def register_checker(self, filetype: str, checker: FileChecker) -> None:
        self.checkers.add(filetype, checker)

    # ------------------------------------------------------------------ the API
    def file_submit(self, url: str, filetype: str, context: dict[str, Any] | str | None = None, *,
                    roots: Roots | None = None) -> FileIntake:
        """Check one file and submit its batch (Go: BulkfileinProcess); the file stays where it is. The same
        file again (URL, size, version) returns its first FileIntake and submits nothing, also when the two
        calls race; that FileIntake then has ``repeat=True``, and a WARNING says "already taken as batch X"
        (a warning: the caller asked for a batch and got none, e.g. a scheduled submit of a file that
        was not replaced since).
        Raises InvalidInput (no such file, bad context), ProcessorNotFound (unknown file type),
        BackendUnavailable (the file's store or PostgreSQL unreachable: then nothing is stored).
        Confined (``roots``, else the intake's own): a URL outside them is refused before it is touched."""
        ftype = validate.file_type(filetype)
        checker = self.checkers.get(ftype)
        ctx = validate.json_object(context if context is not None else {}, "context", self.max_context_bytes)
        confine = roots if roots is not None else self.roots
        if confine is not None:
            url = confine.check(url, "file")
        info = stat(url, self.options_for(url))
        taken = self._take(info, ftype, checker, ctx, folder=None, wait=True)
        assert taken is not None  # waiting for the lock always gets it
        fi = taken.record.intake()
        if taken.new:
            return fi
        first = f"batch {fi.batch_id}" if fi.batch_id else f"a rejected file ({fi.error})"
        get_logger().warning("file_already_taken", url=shown_url(info.url), filetype=ftype, batch=fi.batch_id,
                             status=fi.status, taken_at=fi.reqat.isoformat(), detail=f"already taken as {first}",
                             next="nothing submitted")
        return replace(fi, repeat=True)

    def scan(self, folder_url: str, patterns: dict[str, str] | str, min_age_sec: float = 10,
             context: dict[str, Any] | str | None = None, *, roots: Roots | None = None) -> list[FileIntake]:
        """One pass over the folder's own files (not its subfolders): each file whose name matches a glob
        of ``patterns`` (first match wins) and that is at least ``min_age_sec`` old is taken, exactly once
        across concurrent scans, and moved to ``done/<batch_id>/`` or ``failed/``. Returns the files that
        this pass took, in name order. Files taken earlier whose move was interrupted are moved now.
        Confined (``roots``, else the intake's own): a folder outside them is refused before it is listed,
        and a listed file whose real path leaves them (a symlink) is left alone."""
        pats = validate.file_patterns(patterns)
        checkers = {ftype: self.checkers.get(ftype) for ftype in dict.fromkeys(pats.values())}
        min_age = _min_age(min_age_sec)
        ctx = validate.json_object(context if context is not None else {}, "context", self.max_context_bytes)
        confine = roots if roots is not None else self.roots
        if confine is not None:
            folder_url = confine.check(folder_url, "folder")
        folder = Folder(folder_url, self.options_for(folder_url))
        log = get_logger()
        listed = []
        for info in folder.files():
            if not (ftype := _file_type_of(info.name, pats)):
                continue
            if confine is not None and not confine.allows(info.url):
                log.warning("file_outside_roots", url=shown_url(info.url), next="left alone")
                continue
            listed.append((info, ftype))
        if not listed:
            return []
        with self.store.tx() as q:
            known = {_key_of(r): r for r in q.files_at(urls=[stored_url(i.url) for i, _ in listed])}
        taken: list[FileIntake] = []
        for info, ftype in listed:
            rec = known.get((stored_url(info.url), info.size, info.version))
            if rec is not None:  # taken before: at most its move is left to do
                self._move(folder, rec, info.name, completing=True)
                continue
            age = info.age_sec()
            if age is not None and age < min_age:
                log.debug("file_waits", url=shown_url(info.url), filetype=ftype, age_sec=round(age, 1))
                continue
            try:
                result = self._take(info, ftype, checkers[ftype], ctx, folder=folder, wait=False)
            except _Unreadable as exc:
                log.warning("file_unreadable", url=shown_url(info.url), filetype=ftype, error=str(exc),
                            next="a later pass tries again")
                continue
            if result is None:  # another scan is taking it right now
                continue
            moved = self._move(folder, result.record, info.name, completing=not result.new)
            if result.new:
                taken.append(moved.intake())
        return taken

    def file_list(self, age_days: int = 7) -> list[FileIntake]:
        """Every file taken in the last ``age_days`` days, newest first."""
        age_days = validate.age_days(age_days)
        with self.store.tx() as q:
            recs = q.list_files(age_days=age_days)
        return [r.intake() for r in recs]

    # ------------------------------------------------------------------ taking one file
    def _take(self, info: FileInfo, ftype: str, checker: FileChecker, ctx: dict[str, Any], *,
              folder: Folder | None, wait: bool) -> _Taken | None:
        """Claim, check, submit and record one file in one transaction. None: a scan found it claimed by
        another one. Otherwise its record, new or (``new=False``) the one an earlier taker committed."""
        file = IncomingFile(info, self.options_for(info.url), **self.read_limits)
        url = stored_url(info.url)  # what the tables hold: never a credential
        with self.store.tx() as q:
            if wait:
                q.lock_file(url=url)
            elif not q.try_lock_file(url=url):
                return None
            found = q.get_file(url=url, size=info.size, version=info.version)
            if found is not None:
                return _Taken(found, new=False)
            file_id = str(uuid.uuid4())
            batch, error = self._check_and_insert(q, file, ftype, checker, ctx)
            dest = None
            if folder is not None:
                dest = folder.done_url(batch.id, info.name) if batch else folder.failed_url(info.name, file_id[:8])
            rec = q.insert_file(id=file_id, url=url, size=info.size, version=info.version, filetype=ftype,
                                status=SUBMITTED if batch else REJECTED, batch=batch.id if batch else None,
                                nrows=batch.nrows if batch else 0, error=error,
                                dest=None if dest is None else stored_url(dest))
        log = get_logger()
        if batch is not None:
            log.info("file_submitted", url=shown_url(info.url), filetype=ftype, app=batch.app, op=batch.op,
                     batch=batch.id, nrows=batch.nrows, size=info.size)
            status_change(batch.app, batch.op, batch.id, batch.status.value, nrows=batch.nrows,
                          inputfile=shown_url(info.url))
            self.on_batch(batch)
        else:
            log.warning("file_rejected", url=shown_url(info.url), filetype=ftype, size=info.size, error=error)
        return _Taken(rec, new=True)

    def _check_and_insert(self, q: Queries, file: IncomingFile, ftype: str, checker: FileChecker,
                          ctx: dict[str, Any]) -> tuple[NewBatch | None, str | None]:
        """(the batch, None) for a good file; (None, the reason) for a rejected one, whose half-stored batch
        the savepoint has undone. Unreadable files and PostgreSQL failures raise."""
        try:
            with q.savepoint():
                check = _run_checker(checker, file, ctx)
                app, op = validate.app_name(check.app), validate.op_name(check.op)
                bctx = validate.json_object(check.context if check.context is not None else ctx, "context",
                                            self.max_context_bytes)
                pairs = _guarded(_pairs_of(check.rows, file))
                batch = insert_batch(q, app, op, bctx, pairs, status=BatchStatus.QUEUED,
                                     inputfile=stored_url(file.url), max_rows=self.batchrowmax,
                                     max_input_bytes=self.max_input_bytes)
        except (_Rejected, InvalidInput) as exc:
            return None, _reason(exc)
        return batch, None

    def _move(self, folder: Folder, rec: FileRecord, name: str, *, completing: bool) -> FileRecord:
        """Move a recorded file out of the folder and note it. A failure is logged, never raised: the
        record is committed, and the next pass (which finds the file still there) completes the move."""
        dest = rec.dest
        if dest is None:  # recorded by file_submit, which leaves files where they are; a scan tidies up
            dest = folder.done_url(rec.batch, name) if rec.batch else folder.failed_url(name, rec.id[:8])
        log = get_logger()
        try:
            folder.move(rec.url, dest)
        except Exception as exc:
            log.error("file_move_failed", url=shown_url(rec.url), dest=shown_url(dest), filetype=rec.filetype,
                      batch=rec.batch, error=describe(exc), next="the next pass moves it")
            return rec
        try:
            with self.store.tx() as q:
                moved = q.file_moved(id=rec.id, dest=stored_url(dest))
        except BackendUnavailable as exc:
            log.error("file_move_not_recorded", url=shown_url(rec.url), dest=shown_url(dest), error=str(exc))
            return rec
        log.info("file_move_completed" if completing else "file_moved", url=shown_url(rec.url), dest=shown_url(dest),
                 filetype=rec.filetype, status=rec.status, batch=rec.batch)
        return moved if moved is not None else rec  # (records are never deleted: it is there)


@dataclass(frozen=True, slots=True)
class _Taken:
    record: FileRecord
    new: bool  # False: an earlier taker's record


class _Rejected(Exception):
    """The file is bad: the checker said so or raised, or reading its rows failed."""


class _Unreadable(BackendUnavailable):
    """The file could not be read now (its store unreachable, or the file gone): not the file's fault."""


def _run_checker(checker: FileChecker, file: IncomingFile, ctx: dict[str, Any]) -> FileCheck:
    try:
        check = checker.check(file, dict(ctx))
    except Exception as exc:
        raise _user_error(exc, "the file checker raised") from exc
    if not isinstance(check, FileCheck):
        raise _Rejected(f"the file checker returned {type(check).__name__}, not a FileCheck")
    if not check.ok:
        raise _Rejected(check.error or "rejected by the file checker")
    return check


def _pairs_of(rows: Any, file: IncomingFile) -> Iterator[tuple[Any, Any]]:
    """(line, input) pairs from any form of FileCheck.rows, lazily (nothing is read before the COPY)."""
    import pandas as pd

    if rows is None:
        return iter_rows(frames_to_inputs(file.frames()))
    if isinstance(rows, pd.DataFrame):
        return iter_rows(frames_to_inputs([rows]))
    if isinstance(rows, (str, bytes, dict)) or not isinstance(rows, Iterable):
        raise _Rejected("FileCheck.rows must be BatchInputs, (line, input) tuples, DataFrames or None, "
                        f"got {type(rows).__name__}")
    return _peeked(rows)


def _peeked(rows: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
    import pandas as pd

    it = iter(rows)
    for first in it:
        if isinstance(first, pd.DataFrame):
            yield from iter_rows(frames_to_inputs(chain([first], it)))
        else:
            yield from iter_rows(chain([first], it))
        return


def _guarded(pairs: Iterator[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
    """The pairs, with what goes wrong while producing them (reading, parsing, the checker's own
    iterable) classified: the file's fault rejects it, a read failure defers it."""
    while True:
        try:
            pair = next(pairs)
        except StopIteration:
            return
        except Exception as exc:
            raise _user_error(exc, "reading the rows failed") from exc
        yield pair


def _user_error(exc: Exception, what: str) -> Exception:
    if isinstance(exc, (_Rejected, InvalidInput, _Unreadable)):
        return exc
    if isinstance(exc, (OSError, BackendUnavailable)):
        return _Unreadable(redact_text(f"{what}: {type(exc).__name__}: {exc}"))
    return _Rejected(f"{what}: {type(exc).__name__}: {exc}")


def _reason(exc: Exception) -> str:
    text = redact_text(str(exc).strip()) or type(exc).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 1] + "…"


def _file_type_of(name: str, patterns: dict[str, str]) -> str | None:
    for glob, ftype in patterns.items():
        if fnmatch.fnmatchcase(name, glob):
            return ftype
    return None


def _key_of(rec: FileRecord) -> tuple[str, int, str]:
    return rec.url, rec.size, rec.version


def _min_age(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InvalidInput(f"min_age_sec must be a number >= 0, got {value!r}")
    return float(value)
