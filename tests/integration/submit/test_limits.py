"""Size limits (issue 18), each a setting with a clear InvalidInput and nothing stored: a batch's context
(ALYA_MAX_CONTEXT_BYTES, 64 KiB: a 40 MiB one was accepted and then re-read by every claim and uncached
status), one row's input (ALYA_MAX_INPUT_BYTES, 1 MiB) on every submit path, and a file's line length and
decompressed size (ALYA_MAX_LINE_BYTES, ALYA_MAX_FILE_BYTES) in the intake."""

from __future__ import annotations

import gzip
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from alya import BatchInput, InvalidInput, JobManager
from tests.support.client import rows, stored
from tests.support.config import make_config
from tests.support.intake_app import FILE_TYPE, RowsChecker

BIG_CONTEXT = {"blob": "x" * (40 * 2**20)}  # the probe: 40 MiB


def test_a_context_over_the_limit_is_refused_everywhere(client: JobManager, database_url: str) -> None:
    for call in (lambda: client.batch_submit("lim", "op", BIG_CONTEXT, rows(1)),
                 lambda: client.batch_submit("lim", "op", '{"a": "' + "x" * 70_000 + '"}', rows(1)),
                 lambda: client.slowquery_submit("lim", "op", BIG_CONTEXT, {})):
        with pytest.raises(InvalidInput, match=r"context is larger than 65536 bytes of JSON \(ALYA_MAX_CONTEXT"):
            call()
    assert stored(database_url) == (0, 0)
    client.batch_submit("lim", "op", {"a": "x" * 60_000}, rows(1))  # under it: fine
    assert stored(database_url) == (1, 1)


def test_an_input_over_the_limit_is_refused_on_every_path(client: JobManager, database_url: str) -> None:
    big = {"blob": "y" * (2**20)}
    bid = client.batch_submit("lim", "op", {}, rows(1), wait=True)
    paths = {
        "dicts, row 700 of 700": lambda: client.batch_submit("lim", "op", {}, [*rows(699), BatchInput(700, big)]),
        "JSON text": lambda: client.batch_submit("lim", "op", {}, [(1, '{"blob": "' + "z" * 2**20 + '"}')]),
        "a DataFrame": lambda: client.batch_submit("lim", "op", {}, pd.DataFrame({"line": [1], "input": [big]})),
        "an append": lambda: client.batch_append(bid, [BatchInput(2, {}), BatchInput(3, big)]),
        "a slow query": lambda: client.slowquery_submit("lim", "op", {}, big),
    }
    for what, call in paths.items():
        with pytest.raises(InvalidInput, match=r"larger than 1048576 bytes of JSON \(ALYA_MAX_INPUT_BYTES\)"):
            call()
        assert stored(database_url) == (1, 1), what


@pytest.fixture
def small_limits(database_url: str, file_store_url: str) -> Iterator[JobManager]:
    jm = JobManager(database_url=database_url, object_store_url=file_store_url,
                    config=make_config(max_line_bytes=4096, max_file_bytes=100_000))
    jm.register_file_checker(FILE_TYPE, RowsChecker())
    yield jm
    jm.close()


def test_a_file_past_its_limits_is_rejected_and_read_no_further(small_limits: JobManager, database_url: str,
                                                                tmp_path: Path) -> None:
    """The issue's probe, scaled to the limits set here: a long line in a small .csv.gz, and a gzip that
    expands past the decompressed size. Each is a rejected file (the reason recorded), no batch."""
    long_line = tmp_path / "long.csv.gz"
    with gzip.open(long_line, "wb") as fh:
        fh.write(b"id,x\n1," + b"a" * 50_000 + b"\n")
    expands = tmp_path / "expands.csv.gz"
    with gzip.open(expands, "wb") as fh:
        fh.write(b"id\n" + b"1\n" * 60_000)
    for path, reason in ((long_line, "a line is longer than 4096 bytes (ALYA_MAX_LINE_BYTES)"),
                         (expands, "more than 100000 bytes once decompressed (ALYA_MAX_FILE_BYTES)")):
        t = time.monotonic()
        fi = small_limits.file_submit(str(path), FILE_TYPE)
        assert fi.status == "rejected" and reason in (fi.error or ""), fi.error
        assert time.monotonic() - t < 5
    assert stored(database_url) == (0, 0)
