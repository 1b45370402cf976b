"""``alya demo``: the smallest complete application, run against whatever ALYA_* points at (embedded
PostgreSQL and a local folder when nothing is set)."""

from __future__ import annotations

from typing import Any

import fsspec

from alya import BatchInput, BatchJobResult, BatchStatus, ErrorMessage, JobManager


class Greeter:
    """Greets every row; a row without a name fails with a business error; greetings go to a file."""

    def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]) -> BatchJobResult:
        name = input.get("name")
        if not name:
            return BatchJobResult(BatchStatus.FAILED, messages=[ErrorMessage(1, "missing", field="name")])
        greeting = f"{initblock['salutation']}, {name}!"
        return BatchJobResult(BatchStatus.SUCCESS, {"greeting": greeting}, blobrows={"greetings.txt": greeting})

    def mark_done(self, initblock: Any, context: dict[str, Any], details: Any) -> None:
        print(f"mark_done: batch {details.id} ended {details.status.value} "
              f"({details.nsuccess} ok, {details.nfailed} failed)")


class Salutations:
    def init(self, app: str) -> Any:
        return _Block()


class _Block(dict):  # type: ignore[type-arg]
    def __init__(self) -> None:
        super().__init__(salutation="Hello")

    def is_alive(self) -> bool:
        return True

    def close(self) -> None:
        pass


def run_demo(nrows: int = 2000) -> None:
    jm = JobManager.from_env()
    jm.register_initializer("demo", Salutations())
    jm.register_batch_processor("demo", "greet", Greeter())
    rows = (BatchInput(i, {"name": f"user{i}" if i % 100 else ""}) for i in range(1, nrows + 1))
    batch_id = jm.batch_submit("demo", "greet", {"user": "demo"}, rows)
    print(f"submitted batch {batch_id}: {jm.batch_status(batch_id)}")
    jm.run(stop_when_idle=True)
    done = jm.batch_done(batch_id)
    print(f"status {done.status.value}: {done.nsuccess} success, {done.nfailed} failed")
    for name, url in done.outputfiles.items():
        with fsspec.open(url, "rt") as fh:
            head = [next(fh, "").rstrip() for _ in range(3)]
        print(f"output file {name}: {url}\n  first lines: {head}")
    jm.close()
