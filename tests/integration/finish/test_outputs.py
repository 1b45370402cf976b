"""Output files built from blob rows at summary time, on SeaweedFS S3 and on file://."""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path
from typing import Any

import fsspec
import pytest

from alya import BatchStatus, JobManager
from alya.core.names import batch_prefix
from alya.engine.maintenance import cleanup
from alya.io.outputs import ObjectStore
from tests.support.config import make_config
from tests.support.procs import FastProc, Proc, drain
from tests.support.services import store_sql


def manager(database_url: str, redis_url: str, store_url: str, storage_options: dict[str, Any] | None = None,
            **cfg: Any) -> JobManager:
    return JobManager(database_url=database_url, redis_url=redis_url, object_store_url=store_url,
                      config=make_config(**cfg), storage_options=storage_options)


def read(url: str) -> str:
    with fsspec.open(url, "rb") as fh:
        return fh.read().decode()  # type: ignore[no-any-return]


def blob_input(line: int) -> dict[str, Any]:
    blobs: dict[str, Any] = {"all.txt": f"  line {line}\t \n", "empty.txt": "   \n"}
    if line % 2 == 0:
        blobs["even.csv"] = f"{line},\"two\nlines\"\n\n"
    if line % 50 == 0:
        blobs["rare"] = f"r{line}"
    return {"blobs": blobs}


def expected(lines: range) -> dict[str, str]:
    files = {
        "all.txt": "".join(f"line {n}\n" for n in lines),
        "even.csv": "".join(f"{n},\"two\nlines\"\n" for n in lines if n % 2 == 0),
        "rare": "".join(f"r{n}\n" for n in lines if n % 50 == 0),
    }
    return {name: text for name, text in files.items() if text}


@pytest.mark.parametrize("where", ["s3", "file"])
def test_files_in_line_order_across_chunks_and_workers(where: str, request: pytest.FixtureRequest,
                                                       database_url: str, redis_url: str) -> None:
    url = request.getfixturevalue("s3_url" if where == "s3" else "file_store_url")
    a = manager(database_url, redis_url, url, batchchunk_nrows=7)
    b = manager(database_url, redis_url, url, batchchunk_nrows=7)
    try:
        pa, pb = Proc(), Proc()
        a.register_batch_processor("out", "files", pa)
        b.register_batch_processor("out", "files", pb)
        lines = range(1, 301)
        # submitted out of order, processed by two workers in interleaved chunks
        data = [(n, blob_input(n)) for n in reversed(lines)]
        bid = a.batch_submit("out", "files", {}, data)
        threads = [threading.Thread(daemon=True, target=drain, args=(jm, "out", "files")) for jm in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sum(pa.calls.values()) > 0 and sum(pb.calls.values()) > 0  # both took chunks
        done = a.batch_done(bid)
        assert done.status is BatchStatus.SUCCESS and done.nsuccess == 300
        assert set(done.outputfiles) == set(expected(lines))  # empty values make no file
        prefix = batch_prefix(a.objects.url, "out", "files", bid)
        for name, text in expected(lines).items():
            assert done.outputfiles[name] == f"{prefix}/{name}"
            assert done.outputfiles[name].startswith("s3://" if where == "s3" else "file:///")
            assert read(done.outputfiles[name]) == text
        assert a.batch_status(bid).outputfiles == done.outputfiles
        assert len(pa.done) + len(pb.done) == 1
        assert (pa.done or pb.done)[0].outputfiles == done.outputfiles
    finally:
        a.close()
        b.close()


def test_batch_without_blob_rows_has_no_files(jm: JobManager) -> None:
    jm.register_batch_processor("out", "none", Proc())
    bid = jm.batch_submit("out", "none", {}, [(n, {"blobs": {"x.txt": " "}}) for n in range(1, 11)])
    drain(jm, "out", "none")
    done = jm.batch_done(bid)
    assert done.status is BatchStatus.SUCCESS and done.outputfiles == {}


def test_failed_rows_blob_rows_still_written(jm: JobManager) -> None:
    """Blob rows come from rows that answered (success or failed); faulted rows add nothing."""
    class P(Proc):
        def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]) -> Any:
            from alya import BatchJobResult, ErrorMessage

            if line == 2:
                return BatchJobResult(BatchStatus.FAILED, None, [ErrorMessage(1, "x")], {"log.txt": "failed 2"})
            if line == 3:
                raise RuntimeError("fault")
            return BatchJobResult(BatchStatus.SUCCESS, None, [], {"log.txt": f"ok {line}"})

    jm.register_batch_processor("out", "mixed", P())
    bid = jm.batch_submit("out", "mixed", {}, [(n, {}) for n in range(1, 5)])
    drain(jm, "out", "mixed")
    done = jm.batch_done(bid)
    assert done.status is BatchStatus.FAILED
    assert read(done.outputfiles["log.txt"]) == "ok 1\nfailed 2\nok 4\n"


def _unwritable(kind: str, tmp_path: Path, s3: dict[str, str] | None) -> tuple[str, dict[str, Any] | None]:
    if kind == "bad-credentials":  # SeaweedFS creates a missing bucket on PUT; a refused signature fails
        return f"s3://{s3['bucket'] if s3 else 'x'}/p", {"key": "alyatest", "secret": "wrong-secret"}
    if kind == "unreachable":
        opts = {"endpoint_url": "http://127.0.0.1:9", "retries": 1,
                "config_kwargs": {"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 1}}}
        return f"s3://{s3['bucket'] if s3 else 'x'}/p", opts
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    return (blocker / "objects").as_uri(), None


@pytest.mark.parametrize("kind", ["bad-credentials", "unreachable", "file-blocked"])
def test_failed_upload_leaves_batch_open_until_a_working_store(
        kind: str, database_url: str, redis_url: str, s3_server: dict[str, str], s3_url: str,
        tmp_path: Path) -> None:
    url, opts = _unwritable(kind, tmp_path, s3_server)
    broken = manager(database_url, redis_url, url, storage_options=opts)
    good = manager(database_url, redis_url, s3_url)
    try:
        pb, pg = Proc(), Proc()
        broken.register_batch_processor("out", "upload", pb)
        good.register_batch_processor("out", "upload", pg)
        bid = broken.batch_submit("out", "upload", {}, [(n, blob_input(n)) for n in range(1, 21)])
        t0 = time.monotonic()
        drain(broken, "out", "upload")  # processes every row; the summary's upload fails
        elapsed = time.monotonic() - t0
        s = broken.batch_status(bid)
        assert s.status is BatchStatus.INPROG and s.nsuccess == 20 and s.nqueued == s.ninprog == 0
        assert s.outputfiles == {} and broken.batch_done(bid).rows is None
        assert pb.done == [] and pg.done == []
        assert store_sql(broken.store, "SELECT status::text, doneat, notifiedat, outputfiles FROM batches "
                         "WHERE id = %s", bid) == [("inprog", None, None, {})]
        # retrying with the same broken store changes nothing and does not raise
        rep = cleanup(broken.engine, types=[("out", "upload")])
        assert rep.summarised == [] and broken.batch_status(bid).status is BatchStatus.INPROG
        # a worker with a working store completes it, exactly once
        rep = cleanup(good.engine, types=[("out", "upload")])
        assert rep.summarised == [bid]
        done = good.batch_done(bid)
        assert done.status is BatchStatus.SUCCESS
        assert set(done.outputfiles) == set(expected(range(1, 21)))
        for name, text in expected(range(1, 21)).items():
            assert read(done.outputfiles[name]) == text
        assert len(pg.done) == 1 and pb.done == []
        assert cleanup(good.engine, types=[("out", "upload")]).summarised == []
        assert cleanup(broken.engine, types=[("out", "upload")]).notified == []
        assert elapsed < 60
    finally:
        broken.close()
        good.close()


def test_failed_upload_leaves_no_partial_objects(database_url: str, redis_url: str, s3_url: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An upload that dies after some files were written: the batch stays open, and the next summary
    rewrites the whole file set (objects are replaced, never appended to)."""
    jm = manager(database_url, redis_url, s3_url)
    try:
        proc = Proc()
        jm.register_batch_processor("out", "partial", proc)
        bid = jm.batch_submit("out", "partial", {}, [(n, blob_input(n)) for n in range(1, 101)])
        real = ObjectStore._open
        opened: list[str] = []

        def flaky_open(self: ObjectStore, url: str) -> Any:
            opened.append(url)
            if len(opened) == 2:
                raise OSError("connection reset")
            return real(self, url)

        monkeypatch.setattr(ObjectStore, "_open", flaky_open)
        drain(jm, "out", "partial")
        assert jm.batch_status(bid).status is BatchStatus.INPROG
        monkeypatch.setattr(ObjectStore, "_open", real)
        assert cleanup(jm.engine, types=[("out", "partial")]).summarised == [bid]
        done = jm.batch_done(bid)
        for name, text in expected(range(1, 101)).items():
            assert read(done.outputfiles[name]) == text
        assert len(proc.done) == 1
    finally:
        jm.close()


class _RssSampler:
    """Peak resident set size of this process while running, sampled from /proc every few ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(daemon=True, target=self._run)

    def rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    def __enter__(self) -> _RssSampler:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
def test_200k_rows_summary_memory_is_flat(database_url: str, redis_url: str, s3_url: str) -> None:
    """A 200k-row batch whose rows each append ~400 bytes to a file (~80 MB): the summary streams from a
    server-side cursor to S3 in 5 MiB parts, so the process grows by a small constant (s3fs's part buffer
    and its copies), far less than the file."""
    n = 200_000
    jm = manager(database_url, redis_url, s3_url)
    try:
        proc = FastProc()
        jm.register_batch_processor("out", "big", proc)
        # warm up: the first S3 call loads botocore's service models, a one-off cost of the process
        warm = jm.batch_submit("out", "big", {}, [(1, {"blobs": {"w.txt": "w"}})])
        drain(jm, "out", "big")
        assert jm.batch_status(warm).status is BatchStatus.SUCCESS
        t0 = time.monotonic()
        bid = jm.batch_submit("out", "big", {}, ((i, {}) for i in range(1, n + 1)))
        t_submit = time.monotonic() - t0
        # The rows' results are set in one statement (the engine's own path is tested elsewhere): what is
        # measured here is the summary alone.
        pad = "x" * 400
        store_sql(jm.store,
                  "UPDATE batchrows SET status = 'success', doneat = now(), attempts = 1, "
                  "blobrows = jsonb_strip_nulls(jsonb_build_object("
                  "  'big.txt', lpad(line::text, 8, '0') || %s || E'\\n', "
                  "  'small.txt', CASE WHEN line %% 1000 = 0 THEN line::text || E'\\n' END)) "
                  "WHERE batch = %s", pad, bid)
        store_sql(jm.store, "UPDATE batches SET status = 'inprog' WHERE id = %s", bid)
        gc.collect()
        t0 = time.monotonic()
        with _RssSampler() as rss:
            base = rss.rss()
            assert jm.engine.summarise(bid)
        t_summary = time.monotonic() - t0
        grew = rss.peak - base
        done = jm.batch_done(bid)
        assert done.status is BatchStatus.SUCCESS and done.nsuccess == n
        size = jm.objects.fs.size(done.outputfiles["big.txt"])
        assert size == n * (8 + len(pad) + 1)
        with fsspec.open(done.outputfiles["big.txt"], "rt") as fh:
            for i, text in enumerate(fh, 1):
                if i % 20_000 == 1 or i == n:
                    assert text == f"{i:08d}{pad}\n"
        assert i == n
        assert read(done.outputfiles["small.txt"]) == "".join(f"{k}\n" for k in range(1000, n + 1, 1000))
        print(f"\n200k rows: submit {t_submit:.1f}s, summary {t_summary:.1f}s, file {size / 1e6:.1f} MB, "
              f"RSS grew {grew / 1e6:.1f} MB during the summary")
        assert grew < 40e6 and grew < size / 2, \
            f"summary memory grew {grew / 1e6:.1f} MB for a {size / 1e6:.1f} MB file"
        assert len(proc.done) == 2
    finally:
        jm.close()
