"""Output files in the object store (any fsspec URL): what a batch's summary writes. (fsspec is used by
``alya.io.files`` and ``alya.io.readers`` too, which read the intake's files, and by ``alya.io.export``.)

Files are streamed: blob rows arrive in line order from a server-side cursor and are written to open
fsspec files (s3fs uploads 5 MB parts as they fill), so memory stays flat however large the batch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import fsspec

from alya.core.errors import BackendUnavailable, ConfigError, InvalidInput
from alya.core.logs import get_logger
from alya.core.redact import split_userinfo, url_error
from alya.core.validate import file_name
from alya.io.files import protocols

WRITE_BLOCK = 5 * 2**20


def normalise_blobrows(blobrows: Any) -> dict[str, str] | None:
    """What the processor returned, reduced to what will be written: names checked, values stripped
    with one newline each, empty values dropped. None when nothing is left."""
    if not blobrows:
        return None
    if not isinstance(blobrows, dict):
        raise InvalidInput(f"blobrows must be a dict of file name to text, got {type(blobrows).__name__}")
    out: dict[str, str] = {}
    for name, value in blobrows.items():
        file_name(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise InvalidInput(f"blob row for {name!r} must be text, got {type(value).__name__}")
        text = value.strip()
        if text:
            out[name] = text + "\n"
    return out or None


class ObjectStore:
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        if not isinstance(url, str) or "://" not in url:
            raise ConfigError(url_error("ALYA_OBJECT_STORE_URL", str(url), "not a URL: give an fsspec URL such as "
                                        "s3://bucket/prefix or file:///absolute/path"))
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except (ValueError, TypeError, ImportError) as exc:
            raise ConfigError(url_error("ALYA_OBJECT_STORE_URL", url, f"{type(exc).__name__}: {exc}")) from None
        self._local = "file" in protocols(self.fs)
        self._storage_options = dict(storage_options or {})

    def options_for(self, url: str) -> dict[str, Any]:
        """The JobManager's ``storage_options`` when ``url`` is in the object store's own bucket (or on its
        host, for ftp/sftp/http stores), else none: a file to take in or an export in that bucket needs the
        credentials and endpoint given for the object store, but they must never travel to another bucket
        or host (whoever names ``s3://their-bucket/x.csv`` would receive them), nor to a local path."""
        if not self._storage_options:
            return {}
        return dict(self._storage_options) if same_place(url, self.url, protocols(self.fs)) else {}

    def _open(self, url: str) -> Any:
        path = self.root + url[len(self.url):]
        if self._local:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        # 5 MiB parts (S3's minimum): s3fs would otherwise buffer 50 MiB per open file before uploading
        return self.fs.open(path, "wb", block_size=WRITE_BLOCK)

    def write_files(self, prefix: str, blobrows: Iterable[dict[str, str]]) -> dict[str, str]:
        """Append each row's values to its named files, in the order given; returns name -> URL.

        A failure anywhere raises BackendUnavailable; the caller then leaves the batch unsummarised so
        that the whole file set is written again later (objects are overwritten, never appended to)."""
        handles: dict[str, Any] = {}
        urls: dict[str, str] = {}
        try:
            for row in blobrows:
                for name, text in row.items():
                    if not text:
                        continue
                    fh = handles.get(name)
                    if fh is None:
                        urls[name] = f"{prefix}/{name}"
                        fh = handles[name] = self._open(urls[name])
                    fh.write(text.encode())
            for name in list(handles):
                handles.pop(name).close()
        except Exception as exc:
            for fh in handles.values():
                _discard(fh)
            raise BackendUnavailable(f"object store write failed: {type(exc).__name__}: {exc}") from exc
        return urls


    def delete_files(self, urls: Iterable[str]) -> int:
        """Delete these output files (URLs as ``write_files`` returned them); returns how many existed. A
        file already gone is not an error (a purge that stopped halfway runs again). A URL outside this
        object store is never deleted (the store was moved since, or the value is not alya's): a stored
        value must not make alya delete what the application did not give it; it is logged and left.
        Local stores also lose the batch's emptied folder. Raises BackendUnavailable when the store cannot
        be reached."""
        n = 0
        try:
            for url in urls:
                if not url.startswith(self.url + "/"):
                    get_logger().warning("output_file_outside_store_kept", url=url)
                    continue
                fs, path = self.fs, self.root + url[len(self.url):]
                if not fs.exists(path):
                    continue
                fs.rm(path)
                n += 1
                if "file" in protocols(fs):
                    _remove_empty_dir(fs, path.rsplit("/", 1)[0])
        except Exception as exc:
            raise BackendUnavailable(f"object store delete failed: {type(exc).__name__}: {exc}") from exc
        return n



def same_place(url: str, store_url: str, store_protocols: tuple[str, ...]) -> bool:
    """Whether ``url`` is on the store's file system *and* in its bucket or on its host: the protocol is one
    the store answers to and the authority (bucket, host:port) is the store's, compared without user info
    and case. A local path is local for a local store only."""
    if "://" not in url:
        return "file" in store_protocols
    proto, rest = url.split("://", 1)
    if proto.lower() not in store_protocols:
        return False
    return _authority(rest) == _authority(store_url.split("://", 1)[1])


def _authority(rest: str) -> str:
    """The bucket or host:port of what follows ``scheme://``, without user info, lower-case."""
    _, _, after = split_userinfo("x://" + rest)
    return re.split(r"[/?#]", after, maxsplit=1)[0].lower()


def _remove_empty_dir(fs: Any, path: str) -> None:
    try:
        if not fs.ls(path):
            fs.rmdir(path)
    except OSError:
        pass


def _discard(fh: Any) -> None:
    """Drop a half-written object: an aborted multipart upload leaves nothing behind on S3."""
    try:
        if hasattr(fh, "discard"):
            fh.discard()
            # discard() leaves the file "open" with no buffer: without this, its __del__ would try to
            # upload it again and fail noisily at garbage collection
            fh.closed = True
        else:
            fh.close()
    except Exception:
        pass
