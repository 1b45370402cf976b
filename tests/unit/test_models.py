"""Value types, errors, validation, names, the COPY encoder, output-file names and how summary failures are
compared: the pieces of the contract that need no server."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import orjson
import pytest
from redis.crc import key_slot

import alya
from alya import (
    AlyaError,
    BackendUnavailable,
    BatchDetails,
    BatchDone,
    BatchInput,
    BatchJobResult,
    BatchNotFound,
    BatchOutput,
    BatchStatus,
    BatchSummary,
    ConfigError,
    ErrorMessage,
    InvalidInput,
    InvalidState,
    JobManager,
    ProcessorNotFound,
    SlowQueryDone,
    SlowQueryResult,
)
from alya.batch.finish import _same_way
from alya.core import validate
from alya.core.errors import ConnectionLost, DatabaseNotMigrated, describe
from alya.core.models import messages_from_json
from alya.core.names import done_key, summary_key
from alya.core.records import BatchRecord
from alya.core.validate import json_text_strict
from alya.db.ingest import CopyStream, check_line, encode_input, iter_rows
from alya.io.outputs import normalise_blobrows


# ---------------------------------------------------------------------------------------------- contract surface
def test_everything_in_the_contract_is_exported() -> None:
    for name in ("JobManager", "JobManagerConfig", "BatchStatus", "BatchInput", "ErrorMessage", "BatchJobResult",
                 "SlowQueryResult", "BatchOutput", "BatchDone", "BatchSummary", "SlowQueryDone", "BatchDetails",
                 "Initializer", "InitBlock", "BatchProcessor", "SlowQueryProcessor", "AlyaError", "InvalidInput",
                 "BatchNotFound", "InvalidState", "ProcessorNotFound", "BackendUnavailable", "migrate_database"):
        assert hasattr(alya, name), name
        assert name in alya.__all__, name
    for method in ("from_env", "register_initializer", "register_batch_processor", "register_slowquery_processor",
                   "batch_submit", "batch_append", "wait_off", "batch_done", "batch_status", "batch_abort",
                   "batch_list", "slowquery_submit", "slowquery_done", "slowquery_abort", "slowquery_list", "run"):
        assert callable(getattr(JobManager, method)), method


@pytest.mark.parametrize("cls", [InvalidInput, BatchNotFound, InvalidState, ProcessorNotFound, BackendUnavailable,
                                 ConfigError])
def test_every_error_is_an_alya_error(cls: type[Exception]) -> None:
    assert issubclass(cls, AlyaError)
    with pytest.raises(AlyaError):
        raise cls("x")


def test_field_names_match_the_contract() -> None:
    def names(cls: Any) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    assert names(BatchInput) == ["line", "input"]
    assert names(ErrorMessage) == ["msgid", "errcode", "field", "vals"]
    assert names(BatchJobResult) == ["status", "result", "messages", "blobrows"]
    assert names(SlowQueryResult) == ["status", "result", "messages", "outputfiles"]
    assert names(BatchOutput) == ["line", "status", "res", "messages"]
    # The contract's fields in its order; `error` is ours (why a batch failed without its summary), last
    # and defaulted so that positional construction as the contract shows it still works.
    assert names(BatchDone) == ["status", "rows", "outputfiles", "nsuccess", "nfailed", "naborted", "error"]
    assert names(BatchSummary) == ["status", "outputfiles", "nrows", "nsuccess", "nfailed", "naborted", "nqueued",
                                   "ninprog", "error", "paused"]  # paused: issue 20 (batch control), defaulted
    assert names(SlowQueryDone) == ["status", "result", "messages", "outputfiles"]
    assert names(BatchDetails) == ["id", "app", "op", "type", "status", "context", "inputfile", "reqat", "doneat",
                                   "outputfiles", "nrows", "nsuccess", "nfailed", "naborted", "error", "round",
                                   "paused", "not_before", "deadline"]  # batch control (issue 20), defaulted


# ---------------------------------------------------------------------------------------------- values
def test_batch_status() -> None:
    assert [s.value for s in BatchStatus] == ["wait", "queued", "inprog", "success", "failed", "aborted"]
    assert {s for s in BatchStatus if s.is_final} == {BatchStatus.SUCCESS, BatchStatus.FAILED, BatchStatus.ABORTED}
    assert BatchStatus("success") is BatchStatus.SUCCESS
    assert BatchStatus.SUCCESS == "success" and str(BatchStatus.INPROG) == "inprog" and f"{BatchStatus.WAIT}" == "wait"
    assert orjson.dumps({"s": BatchStatus.FAILED}) == b'{"s":"failed"}'


def test_a_summary_is_spelled_out_once() -> None:
    """as_row is every field of BatchSummary (the cached form, the Prefect and CLI tables); from_row reads it
    back, also without the defaulted ``error`` (values cached before it existed); done() carries the shared
    fields into BatchDone; a BatchRecord's details are every BatchDetails field by name."""
    s = BatchSummary(BatchStatus.FAILED, {"a.txt": "s3://b/a.txt"}, 10, 7, 2, 1, 0, 0, error="boom")
    row = s.as_row()
    assert list(row) == [f.name for f in dataclasses.fields(BatchSummary)] and row["status"] == "failed"
    assert orjson.loads(orjson.dumps(row)) == row
    assert BatchSummary.from_row({**row, "ver": 3, "final": True}) == s
    assert BatchSummary.from_row({k: v for k, v in row.items() if k != "error"}) == dataclasses.replace(s, error=None)
    rows = [BatchOutput(1, BatchStatus.SUCCESS, {}, [])]
    assert s.done(rows) == BatchDone(BatchStatus.FAILED, rows, {"a.txt": "s3://b/a.txt"}, 7, 2, 1, error="boom")
    rec = BatchRecord.from_row(("00000000-0000-4000-8000-000000000001", "app", "op", "B", "failed", {"k": 1},
                                None, "reqat", "doneat", None, 10, 7, 2, 1, 5, "boom", 2, False, None, None))
    assert rec.outputfiles == {} and rec.ver == 5 and rec.status is BatchStatus.FAILED and rec.round == 2
    details = rec.details()
    assert all(getattr(details, f.name) == getattr(rec, f.name) for f in dataclasses.fields(BatchDetails))
    assert BatchRecord.COLUMNS.split(", ") == [
        "status::text" if f.name == "status" else f.name for f in dataclasses.fields(BatchRecord)]


def test_describe_names_the_error_in_one_capped_line() -> None:
    assert describe(ValueError("bad value")) == "ValueError: bad value"
    assert describe(RuntimeError("x" * 2000)) == "RuntimeError: " + "x" * 486


def test_error_message_serialisation_omits_absent_keys() -> None:
    assert ErrorMessage(1, "bad").to_dict() == {"msgid": 1, "errcode": "bad"}
    full = ErrorMessage(2, "range", field="amount", vals=["1", "10"])
    assert full.to_dict() == {"msgid": 2, "errcode": "range", "field": "amount", "vals": ["1", "10"]}
    assert ErrorMessage.from_dict(full.to_dict()) == full
    assert messages_from_json(None) == [] and messages_from_json([{"msgid": 3, "errcode": "x"}]) == [
        ErrorMessage(3, "x")]


def test_values_are_frozen_and_defaults_are_not_shared() -> None:
    a, b = BatchJobResult(BatchStatus.SUCCESS), BatchJobResult(BatchStatus.SUCCESS)
    assert a.messages == [] and a.blobrows == {} and a.result is None
    assert a.messages is not b.messages and a.blobrows is not b.blobrows
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.status = BatchStatus.FAILED  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        BatchInput(1, {}).line = 2  # type: ignore[misc]
    assert SlowQueryResult(BatchStatus.FAILED).outputfiles == {}


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("app", ["a", "bank", "a_1", "x" * 64, "app2_v3"])
def test_good_apps(app: str) -> None:
    assert validate.app_name(app) == app


@pytest.mark.parametrize("app", ["", "A", "Bank", "1x", "_a", "a-b", "a.b", "a b", "x" * 65, "ok\n", "\nok", "ok\r",
                                 "ök", None, 1, b"bank"])
def test_bad_apps(app: Any) -> None:
    with pytest.raises(InvalidInput):
        validate.app_name(app)


def test_ops_are_lower_cased() -> None:
    assert validate.op_name("SendMail") == "sendmail"
    assert validate.op_name("v1.import-csv") == "v1.import-csv"
    for bad in ("", "1op", "op\n", "a b", "x" * 65, None, "op/x"):
        with pytest.raises(InvalidInput):
            validate.op_name(bad)


def test_json_object() -> None:
    assert validate.json_object({"a": [1]}, "context") == {"a": [1]}
    assert validate.json_object('{"a": 1}', "context") == {"a": 1}
    assert validate.json_object(b'{"a": 1}', "context") == {"a": 1}
    assert validate.json_object({"a": "\\u0000"}, "context") == {"a": "\\u0000"}  # text, not a NUL
    bads: tuple[Any, ...] = ("[1]", "1", "null", "{", [], None, 1.5, {1: 2}, {"a": {1, 2}}, {"a": "\x00"},
                             '{"a": "\\u0000"}')
    for bad in bads:
        with pytest.raises(InvalidInput):
            validate.json_object(bad, "context")


def test_has_nul() -> None:
    for value, expected in [("a\x00", True), ("\\u0000", False), ("\\\x00", True), ("\\\\u0000", False),
                            ("\x00\\u0000", True), ("plain", False), ("\\\\\\u0000", False)]:
        assert validate.has_nul(orjson.dumps({"k": value})) is expected, repr(value)
        assert validate.has_nul(orjson.dumps({value: 1})) is expected, repr(value)


def test_batch_ids_are_normalised_or_not_found() -> None:
    u = "3FA85F64-5717-4562-B3FC-2C963F66AFA6"
    assert validate.batch_id(u) == u.lower()
    assert validate.batch_id("{" + u + "}") == u.lower()
    for bad in ("", "x", None, 5, "3fa85f64-5717-4562-b3fc"):
        with pytest.raises(BatchNotFound):
            validate.batch_id(bad)


def test_file_names() -> None:
    assert validate.file_name("report_1.csv") == "report_1.csv"
    for bad in ("", "../x", "a/b", "a..b", "x\n", "ä", None, "a" * 201):
        with pytest.raises(InvalidInput):
            validate.file_name(bad)


def test_age_days() -> None:
    assert validate.age_days(0) == 0 and validate.age_days(7) == 7
    assert validate.age_days(10**15) == validate.MAX_AGE_DAYS
    for bad in (-1, True, 1.5, "7", None):
        with pytest.raises(InvalidInput):
            validate.age_days(bad)


# ---------------------------------------------------------------------------------------------- COPY encoding
def test_encode_input_escapes_for_copy_text_format() -> None:
    assert encode_input({"a": 1}, 1) == b'{"a":1}'
    assert encode_input('{"a": "x\\ty"}', 1) == b'{"a":"x\\\\ty"}'  # JSON escape, backslash doubled for COPY
    assert b"\t" not in encode_input({"t": "\t", "n": "\n"}, 1)
    assert b"\n" not in encode_input({"t": "\t", "n": "\n"}, 1)
    for bad in ([1], "[1]", "x", None, {"a": "\x00"}, {1: 1}):
        with pytest.raises(InvalidInput):
            encode_input(bad, 1)


def test_check_line() -> None:
    assert check_line(1, 1) == 1 and check_line(2**31 - 1, 1) == 2**31 - 1 and check_line(0, 0) == 0
    for bad in (0, -5, 2**31, True, 1.0, "1", None):
        with pytest.raises(InvalidInput):
            check_line(bad, 1)


def test_copy_stream_is_lazy_counted_and_bounded() -> None:
    pulled = 0

    def gen(n: int) -> Any:
        nonlocal pulled
        for i in range(1, n + 1):
            pulled += 1
            yield BatchInput(i, {"i": i})

    stream = CopyStream("b", iter_rows(gen(100_000)), max_rows=10**6)
    first = stream.read(1024)
    assert first.startswith(b'b\t1\t{"i":1}\n')
    assert pulled < 1000  # only what one read needs
    total = len(first)
    while chunk := stream.read(1 << 16):
        total += len(chunk)
    assert stream.count == 100_000 and stream.error is None

    over = CopyStream("b", iter_rows(gen(11)), max_rows=10)
    with pytest.raises(InvalidInput):
        while over.read(1 << 16):
            pass
    assert isinstance(over.error, InvalidInput)


def test_iter_rows_shapes() -> None:
    import pandas as pd

    assert list(iter_rows([BatchInput(1, {"a": 1}), (2, "{}")])) == [(1, {"a": 1}), (2, "{}")]
    assert list(iter_rows(pd.DataFrame({"line": [3], "input": [{"b": 2}]}))) == [(3, {"b": 2})]
    for bad in (None, "rows", {"line": 1}, 5):
        with pytest.raises(InvalidInput):
            iter_rows(bad)
    with pytest.raises(InvalidInput):
        list(iter_rows([[1, {}]]))


# ------------------------------------------------------------------------------------------------ errors, results
def test_errors_are_alya_errors() -> None:
    assert issubclass(ConnectionLost, BackendUnavailable) and issubclass(DatabaseNotMigrated, ConfigError)
    assert issubclass(ConfigError, AlyaError)


def test_json_text_strict_for_results() -> None:
    assert json_text_strict({"a": [1, None, 2.5], "b": "x"}) == '{"a":[1,null,2.5],"b":"x"}'
    assert json_text_strict(None) == "null"
    assert json_text_strict(1.5) == "1.5"
    for bad in ({"a": math.nan}, [math.inf], {"a": {"b": -math.inf}}, {"a": "x\x00"}, {1: 2}, {"a": 2**64},
                {"a": object()}, math.nan):
        with pytest.raises(InvalidInput):
            json_text_strict(bad)
    with pytest.raises(InvalidInput, match="blob"):
        json_text_strict({"a": math.nan}, "blob")


# ---------------------------------------------------------------------------------------------- names
def test_keys_carry_the_batch_id_as_hash_tag() -> None:
    bid = "5d1f0a3e-8c2b-4f5e-9a7d-0b1c2d3e4f50"
    assert summary_key(bid) == "alya:{" + bid + "}:summary"
    assert done_key(bid) == "alya:{" + bid + "}:done"
    assert key_slot(summary_key(bid).encode()) == key_slot(done_key(bid).encode()) == key_slot(bid.encode())


# ---------------------------------------------------------------------------------------------- output files
def test_normalise_blobrows() -> None:
    assert normalise_blobrows({}) is None and normalise_blobrows(None) is None
    assert normalise_blobrows({"a": "  x \n"}) == {"a": "x\n"}
    assert normalise_blobrows({"a": "", "b": " \t\n", "c": None}) is None
    assert normalise_blobrows({"a-1_b.TXT": "y"}) == {"a-1_b.TXT": "y\n"}
    for bad in ("../x", "a/b", "..", "", "a b", ".\\x", "x..y"):
        with pytest.raises(InvalidInput, match="unsafe"):
            normalise_blobrows({bad: "v"})
    with pytest.raises(InvalidInput):
        normalise_blobrows({"a": 1})
    with pytest.raises(InvalidInput):
        normalise_blobrows(["a"])


# ---------------------------------------------------------------------------------------------- summary failures
def test_failures_that_differ_only_in_numbers_and_ids_count_as_the_same() -> None:
    a = BackendUnavailable("object store write failed: ConnectionError: 127.0.0.1:8333 request 5f3a9c01e2 "
                           "at 2026-11-30 10:01:02")
    b = BackendUnavailable("object store write failed: ConnectionError: 127.0.0.1:8334 request 0b77aa41fe "
                           "at 2026-11-30 10:09:55")
    c = BackendUnavailable("object store write failed: PermissionError: access denied")
    assert _same_way(a) == _same_way(b) != _same_way(c)


def test_batch_types_whose_prefect_names_collide_are_refused() -> None:
    """Issue 18: (bank_x, y) and (bank, x_y) were both the flow alya-bank-x-y: a run could go to the wrong
    flow. The second registration is a ConfigError naming both; nothing is replaced."""
    from alya.core.errors import ConfigError
    from alya.core.registry import Registry

    class P:
        def do_batch_job(self, *a: object) -> None: ...
        def mark_done(self, *a: object) -> None: ...

    reg = Registry()
    reg.add_processor("bank_x", "y", "B", P())
    for app, op in (("bank", "x_y"), ("bank", "x.y"), ("bank", "x-y")):
        with pytest.raises(ConfigError, match="bank_x/y") as exc:
            reg.add_processor(app, op, "B", P())
        assert f"{app}/{op}" in str(exc.value) and "alya-bank-x-y" in str(exc.value)
    reg.add_processor("bank_x", "y", "B", P())  # the same type again replaces its processor, as before
    assert [(r.app, r.op) for r in reg.batch_types()] == [("bank_x", "y")]
