"""What JSON values a submit takes: NaN and Infinity are refused everywhere (contexts, inputs, rows as
tuples and DataFrames, slow queries, appends; as values and as JSON text) and store nothing; nulls and
large finite floats are kept; a bad inputfile is InvalidInput."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest

from alya import BatchInput, InvalidInput, JobManager
from tests.support.client import rows, stored
from tests.support.services import sql

APP = "rel"


@pytest.mark.parametrize("inputfile", ["a\x00b", "\x00", "\ud800.csv", 7])
def test_a_bad_inputfile_is_invalid_input(client: JobManager, database_url: str, inputfile: Any) -> None:
    with pytest.raises(InvalidInput, match="inputfile"):
        client.batch_submit(APP, "op", {}, rows(2), inputfile=inputfile)
    assert stored(database_url) == (0, 0)


NONFINITE = [math.nan, math.inf, -math.inf]


def bad_values(x: float) -> list[Any]:
    return [{"v": x}, {"a": [1, {"b": x}]}, {"a": [[[x]]]}, {"a": (1.0, x)}]


@pytest.mark.parametrize("x", NONFINITE, ids=["nan", "inf", "-inf"])
def test_nan_and_infinity_are_refused_everywhere(client: JobManager, database_url: str, x: float) -> None:
    import pandas as pd

    for value in bad_values(x):
        with pytest.raises(InvalidInput, match="NaN or Infinity"):
            client.batch_submit(APP, "op", value, rows(2))  # context
        with pytest.raises(InvalidInput, match="NaN or Infinity"):  # input, the fast path, on line 700
            client.batch_submit(APP, "op", {}, [*rows(699), BatchInput(700, value)])
        with pytest.raises(InvalidInput, match="NaN or Infinity"):  # (line, input) tuples
            client.batch_submit(APP, "op", {}, [(1, {"ok": 1}), (2, value)])
        with pytest.raises(InvalidInput, match="NaN or Infinity"):  # a DataFrame
            client.batch_submit(APP, "op", {}, pd.DataFrame({"line": [1, 2], "input": [{"a": None}, value]}))
        with pytest.raises(InvalidInput, match="NaN or Infinity"):
            client.slowquery_submit(APP, "q", {}, value)
        with pytest.raises(InvalidInput, match="NaN or Infinity"):
            client.slowquery_submit(APP, "q", value, {})
    assert stored(database_url) == (0, 0)
    bid = client.batch_submit(APP, "op", {}, rows(2), wait=True)
    with pytest.raises(InvalidInput, match="NaN or Infinity"):
        client.batch_append(bid, [BatchInput(3, {"x": None}), BatchInput(4, {"x": x})])
    assert stored(database_url) == (1, 2)
    assert client.batch_status(bid).nrows == 2


@pytest.mark.parametrize("text", ['{"v": NaN}', '{"v": Infinity}', '{"v": -Infinity}', '{"v": 1e999}',
                                  '{"v": [-1e400]}'])
def test_nan_and_infinity_in_json_text_are_refused(client: JobManager, database_url: str, text: str) -> None:
    with pytest.raises(InvalidInput):
        client.batch_submit(APP, "op", text, rows(1))
    with pytest.raises(InvalidInput):
        client.batch_submit(APP, "op", {}, [BatchInput(1, text)])  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        client.batch_submit(APP, "op", {}, [(1, text.encode())])
    with pytest.raises(InvalidInput):
        client.slowquery_submit(APP, "q", {}, text)
    assert stored(database_url) == (0, 0)


def test_nulls_and_large_finite_floats_are_kept(client: JobManager, database_url: str) -> None:
    value = {"n": None, "big": 1.7976931348623157e308, "tiny": 5e-324, "neg": -0.5, "l": [None, 1e300]}
    bid = client.batch_submit(APP, "op", value, [BatchInput(1, value)])
    got = sql(database_url, "SELECT b.context::text, r.input::text FROM batches b JOIN batchrows r ON r.batch = b.id "
                            "WHERE b.id = %s", bid)[0]
    # PostgreSQL writes 1e300 as 1000…0; orjson (which alya reads jsonb with) reads that back as the float
    assert orjson.loads(got[0]) == value and orjson.loads(got[1]) == value
    assert client.batch_list(APP)[0].context == value
