"""Helpers of the ALYA_DISPATCH=prefect tests (tests/integration/dispatch and abort), on the session's
Prefect test harness: the batch type ``disp/work`` (fixtures ``djm`` and ``deployment_id`` in
tests/integration/conftest.py) and the flow runs of a batch, found by its ``alya-batch:<id>`` tag."""

from __future__ import annotations

import socket
import time
from typing import Any

from alya import BatchInput, BatchStatus

APP, OP = "disp", "work"


class Noop:
    def do_batch_job(self, initblock: Any, context: dict[str, Any], line: int, input: dict[str, Any]) -> Any:
        from alya import BatchJobResult

        return BatchJobResult(status=BatchStatus.SUCCESS)

    def mark_done(self, initblock: Any, context: dict[str, Any], details: Any) -> None:
        pass


def rows(n: int) -> list[BatchInput]:
    return [BatchInput(i, {"i": i}) for i in range(1, n + 1)]


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/api"


def runs_of(batch_id: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        return list(client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"alya-batch:{batch_id}"]))))


def state_of(run_id: Any) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    return str(run.state.type.value) if run.state else "NONE"


def wait_state(run_id: Any, want: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while (got := state_of(run_id)) != want and time.monotonic() < deadline:
        time.sleep(0.2)
    return got
