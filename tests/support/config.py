"""The JobManagerConfig the tests use: small chunks, no retry backoff, fast polling."""

from __future__ import annotations

from typing import Any

from alya import JobManagerConfig


def make_config(**overrides: Any) -> JobManagerConfig:
    base: dict[str, Any] = {"batchchunk_nrows": 100, "retry_backoff_sec": 0.0, "poll_sec": 0.1, "recovery_sec": 60,
                            "events": False}  # Prefect events: only the tests of them (tests/integration/events)
    base.update(overrides)
    return JobManagerConfig(**base)
