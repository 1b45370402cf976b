"""Running the ``alya`` command in this process (typer's CliRunner) and writing input files for it; the
``env`` fixture of tests/integration/conftest.py points it at the test's services."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from typer.testing import CliRunner

from alya.cli.main import app


def cli(*args: str, code: int = 0) -> Any:
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == code, (res.stdout, res.stderr, res.exception)
    return res


def as_json(*args: str) -> Any:
    return json.loads(cli(*args, "--json").stdout)


def write(path: Path, fmt: str, records: list[dict[str, Any]]) -> str:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "csv":
        pd.DataFrame(records).to_csv(path, index=False)
    else:
        pd.DataFrame(records).to_parquet(path)
    return str(path)
