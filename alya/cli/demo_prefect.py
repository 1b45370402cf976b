"""The demo's Prefect side: start Prefect's API early, on a thread, and find the demo's flow runs after.

Without PREFECT_API_URL, Prefect starts a temporary local server the first time anything needs its API
(7-14 s here). The demo asks for it at once, on a thread, so that it starts while PostgreSQL starts and the
batch is stored, and waits for it (saying so) before its worker needs it. The server is Prefect's own
singleton, so the worker's flow runs use this same one; it stops when the process exits."""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any


class Prefect:
    def __init__(self) -> None:
        self.api_url: str | None = None
        self.started_at = dt.datetime.now(dt.UTC)
        self.error: BaseException | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._start, name="alya-demo-prefect", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        t = time.perf_counter()
        try:
            from prefect.client.orchestration import get_client

            self.api_url = _profile_api_url()  # from the environment or a Prefect profile

            with get_client(sync_client=True) as client:  # starts the temporary server when there is no API
                failure = client.api_healthcheck()
            if failure is not None:
                raise failure
        except BaseException as exc:  # reported by wait(), on the main thread
            self.error = exc
        self.seconds = time.perf_counter() - t

    def wait(self, tour: Any) -> None:
        from alya.core.errors import ConfigError

        what = ("Prefect: starting a temporary local server; its first start takes a few seconds"
                if not self.api_url else f"Prefect: {self.api_url}")
        with tour.console.status(what):
            self._thread.join()
        if self.error is not None:
            raise ConfigError(f"Prefect's API did not answer ({self.api_url or 'temporary server'}): "
                              f"{str(self.error).splitlines()[0] if str(self.error) else type(self.error).__name__}")
        if self.api_url:
            tour.step("Prefect", f"the server at {self.api_url} (PREFECT_API_URL)")
        else:
            tour.step("Prefect", "temporary local server (PREFECT_API_URL unset)", self.seconds)

    def runs(self, flow_name: str) -> list[str]:
        """'name (state)' of the flow runs of ``flow_name`` since the demo started, with UI links when
        there is a real server; empty when Prefect cannot say (the demo does not depend on it)."""
        try:
            from prefect.client.orchestration import get_client
            from prefect.client.schemas.filters import (
                FlowFilter,
                FlowFilterName,
                FlowRunFilter,
                FlowRunFilterStartTime,
            )
            from prefect.client.schemas.sorting import FlowRunSort

            with get_client(sync_client=True) as client:
                found = client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                    flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=self.started_at)),  # type: ignore[arg-type]
                    sort=FlowRunSort.START_TIME_ASC, limit=10)
        except Exception:
            return []
        ui = _ui_url() if self.api_url else None
        out = []
        for run in found:
            state = run.state.name if run.state is not None else "?"
            link = f"  {ui}/runs/flow-run/{run.id}" if ui else ""
            out.append(f"flow {flow_name}, run '{run.name}' ({state}){link}")
        return out


def warm_up() -> Prefect:
    return Prefect()


def _profile_api_url() -> str | None:
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


def _ui_url() -> str | None:
    try:
        from prefect.settings import get_current_settings

        return get_current_settings().ui_url or None
    except Exception:
        return None
