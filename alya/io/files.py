"""Files of rows in any fsspec store (a local folder, ``file://``, ``s3://``...), as the file intake sees
them: what a listing says about a file (size, version, age), the :class:`IncomingFile` a checker reads, and
the move to ``done/`` or ``failed/``.

A file is identified by its URL, size and *version*: its ETag where the store has one (S3), else its
modification time. A file rewritten in place is thus a new file, and the same file seen by two scans is one.
"""

from __future__ import annotations

import datetime as dt
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Protocol, runtime_checkable

import fsspec

from alya.core.errors import BackendUnavailable, InvalidInput
from alya.core.models import FileCheck
from alya.core.names import intake_done_url, intake_failed_url
from alya.core.redact import redact_text, shown_url
from alya.io.readers import read_frames

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True, slots=True)
class FileInfo:
    """One file as a listing (or a stat) shows it."""

    url: str  # full fsspec URL: file:///abs/path, s3://bucket/key
    name: str
    size: int
    version: str  # "etag:<ETag>" or "mtime:<seconds>"
    mtime: float | None  # seconds since the epoch, if the store says

    def age_sec(self, now: float | None = None) -> float | None:
        return None if self.mtime is None else (now if now is not None else time.time()) - self.mtime


class IncomingFile:
    """A file offered to a :class:`FileChecker`: its URL, name and size, a streamed ``open()``, and
    ``frames()``, its rows as pandas DataFrames of at most ``chunksize`` rows (CSV, Parquet or JSON lines,
    by extension; see ``alya.io.readers``). Nothing is read until the checker asks. ``max_line_bytes`` and
    ``max_bytes`` bound what ``frames()`` reads (a line, the whole decompressed file): a file past them is
    refused (InvalidInput), so a small compressed file cannot blow up memory."""

    def __init__(self, info: FileInfo, storage_options: dict[str, Any] | None = None, *,
                 max_line_bytes: int | None = None, max_bytes: int | None = None) -> None:
        self.info = info
        self._storage_options = dict(storage_options or {})
        self._limits = {k: v for k, v in (("max_line_bytes", max_line_bytes), ("max_bytes", max_bytes))
                        if v is not None}

    @property
    def url(self) -> str:
        return self.info.url

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def size(self) -> int:
        return self.info.size

    def open(self) -> IO[bytes]:
        """The file's bytes, streamed (a context manager; close it)."""
        fh: IO[bytes] = fsspec.open(self.url, "rb", **self._storage_options).open()
        return fh

    def frames(self, chunksize: int = 50_000, dtype: Any = None) -> Iterator[pd.DataFrame]:
        """The rows as DataFrames of at most ``chunksize`` rows, in file order; memory stays flat whatever
        the file's size. A missing cell is missing from its row's input (never a float NaN). ``dtype``
        (CSV only) is handed to pandas: ``str``, or a dict of column -> dtype, keeps text as text."""
        return read_frames(self.url, chunksize=chunksize, storage_options=self._storage_options, dtype=dtype,
                           **self._limits)

    def __repr__(self) -> str:
        return f"IncomingFile({shown_url(self.url)!r}, size={self.size})"


@runtime_checkable
class FileChecker(Protocol):
    """Registered per file type (``jm.register_file_checker``): says whether a file is good and, if so,
    which batch it becomes. Raising rejects the file (the reason is the exception)."""

    def check(self, file: IncomingFile, context: dict[str, Any]) -> FileCheck: ...


class Folder:
    """The files directly in one folder (not its subfolders), and the moves out of it."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.storage_options = dict(storage_options or {})
        try:
            self.fs, self.path = fsspec.core.url_to_fs(url, **self.storage_options)
        except (ValueError, ImportError) as exc:
            raise InvalidInput(f"not a folder URL: {shown_url(url)!r} ({type(exc).__name__})") from None
        except OSError as exc:  # the file system's client could not even be made (connection refused)
            raise BackendUnavailable(f"cannot reach {shown_url(url)}: {type(exc).__name__}") from exc
        self.path = self.path.rstrip("/") or self.path
        self.url = self.fs.unstrip_protocol(self.path).rstrip("/")
        self.local = "file" in protocols(self.fs)

    def files(self) -> list[FileInfo]:
        """The folder's own files, by name; hidden files (``.name``) are left alone (uploads in progress).
        A missing local folder is an error; a missing object-store prefix is an empty folder."""
        self.fs.invalidate_cache(self.path)  # s3fs caches listings: a second pass must see new files
        try:
            entries = self.fs.ls(self.path, detail=True)
        except FileNotFoundError:
            if self.local:
                raise InvalidInput(f"no folder at {shown_url(self.url)}") from None
            return []
        except NotADirectoryError:
            raise InvalidInput(f"not a folder: {shown_url(self.url)}") from None
        except Exception as exc:  # OSError, and what the store's client raises itself (botocore: no credentials)
            raise BackendUnavailable(f"cannot list {shown_url(self.url)}: {type(exc).__name__}: {_said(exc)}") from exc
        out = []
        for entry in entries:
            if entry.get("type") != "file":
                continue
            path = str(entry["name"]).rstrip("/")
            name = posixpath.basename(path)
            if not name or name.startswith(".") or posixpath.dirname(path).rstrip("/") != self.path:
                continue
            out.append(file_info(self.fs, path, entry))
        return sorted(out, key=lambda f: f.name)

    def done_url(self, batch_id: str, name: str) -> str:
        return intake_done_url(self.url, batch_id, name)

    def failed_url(self, name: str, unique: str) -> str:
        """``failed/<name>``, or ``failed/<unique>-<name>`` when an earlier rejected file holds that name
        (a rejected file is evidence: it is never overwritten)."""
        url = intake_failed_url(self.url, name)
        return intake_failed_url(self.url, f"{unique}-{name}") if self.exists(url) else url

    def exists(self, url: str) -> bool:
        try:
            return bool(self.fs.exists(self._path_of(url)))
        except OSError:
            return False

    def move(self, src_url: str, dst_url: str) -> None:
        """Move a file; idempotent, so that a move interrupted by a crash, or made by two scans at once,
        ends with the file at ``dst_url`` (the source gone and the destination there is success)."""
        src, dst = self._path_of(src_url), self._path_of(dst_url)
        if self.local:
            self.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
        try:
            self.fs.mv(src, dst)
        except FileNotFoundError:
            self.fs.invalidate_cache(posixpath.dirname(dst))
            if not self.fs.exists(dst):
                raise
        finally:
            self.fs.invalidate_cache(self.path)

    def _path_of(self, url: str) -> str:
        if not url.startswith(self.url + "/"):
            raise InvalidInput(f"{shown_url(url)} is not in {shown_url(self.url)}")
        return self.path + url[len(self.url):]


def stat(url: str, storage_options: dict[str, Any] | None = None) -> FileInfo:
    """The file at a path or URL. InvalidInput when there is none; BackendUnavailable when its store
    cannot be reached."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidInput(f"a file URL or path is needed, got {type(url).__name__}")
    shown = shown_url(url)
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ValueError, ImportError) as exc:
        raise InvalidInput(f"not a file URL: {shown!r} ({type(exc).__name__})") from None
    except OSError as exc:  # the file system's client could not even be made (connection refused)
        raise BackendUnavailable(f"cannot reach {shown}: {type(exc).__name__}") from exc
    try:
        fs.invalidate_cache(path)
        entry = fs.info(path)
    except FileNotFoundError:
        raise InvalidInput(f"no file at {shown}") from None
    except Exception as exc:  # OSError, and what the store's client raises itself (botocore: no credentials)
        raise BackendUnavailable(f"cannot read {shown}: {type(exc).__name__}: {_said(exc)}") from exc
    if entry.get("type") != "file":
        raise InvalidInput(f"not a file: {shown}")
    return file_info(fs, path, entry)


def _said(exc: BaseException) -> str:
    """What a store's client said, its URLs redacted (a client may quote the URL it was given), one line."""
    text = redact_text(str(exc).strip())
    return (text.splitlines() or [""])[0][:300]


def file_info(fs: Any, path: str, entry: dict[str, Any]) -> FileInfo:
    mtime = _mtime(entry)
    etag = entry.get("ETag") or entry.get("etag")
    if etag:
        version = "etag:" + str(etag).strip('"')
    elif mtime is not None:
        version = f"mtime:{mtime:.6f}"
    else:  # a store that tells neither: the size alone must do (a rewrite of the same size is not seen)
        version = "unknown"
    return FileInfo(url=fs.unstrip_protocol(path), name=posixpath.basename(path.rstrip("/")),
                    size=int(entry.get("size") or 0), version=version, mtime=mtime)


def _mtime(entry: dict[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "updated", "mtime_ns", "created"):
        value = entry.get(key)
        if value is None:
            continue
        if key == "mtime_ns":
            return float(value) / 1e9
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, dt.datetime):
            return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).timestamp()
        if isinstance(value, str):
            try:
                parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
            return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).timestamp()
    return None


def protocols(fs: Any) -> tuple[str, ...]:
    """The protocols an fsspec file system answers to (``file``, ``local``; ``s3``, ``s3a``; ...)."""
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)
