"""Every deployment in the repository's definitions files (prefect.yaml and the docker / kubernetes
recipes) and every served one (``flows.serve``) is named as ``alya.core.names`` says, after what it
runs, so the dispatcher finds it and a person reads it; each flow and deployment has a description.
The entrypoints are imported (the flows' JobManager connects lazily: no database is reached)."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import yaml

from alya.core import names
from tests.support.prefect_server import REPO

FILES = ["prefect.yaml", "deployments/prefect.docker.yaml", "deployments/prefect.kubernetes.yaml"]


def expected_name(flow_name: str) -> str:
    """The deployment name names.py gives the flow ``flow_name``."""
    fixed = {names.SWEEPER_FLOW: names.SWEEPER_DEPLOYMENT, names.INTAKE_FLOW: names.INTAKE_DEPLOYMENT,
             names.SUBMIT_FILE_FLOW: names.SUBMIT_FILE_DEPLOYMENT}
    if flow_name in fixed:
        return fixed[flow_name]
    from flows import bank, mail, report

    for mod in (bank, mail, report):
        if names.flow_name(mod.APP, mod.OP) == flow_name:
            return names.type_deployment(mod.APP, mod.OP)
    raise AssertionError(f"no batch type has the flow {flow_name}")


def load(entrypoint: str) -> Any:
    path, attr = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), attr)


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALYA_DATABASE_URL", "postgresql://unused@127.0.0.1:1/unused")  # never connected


@pytest.mark.parametrize("file", FILES)
def test_defined_deployments_are_named_after_their_flows(file: str) -> None:
    spec = yaml.safe_load((REPO / file).read_text())
    full = []
    for dep in spec["deployments"]:
        flow = load(dep["entrypoint"])
        assert dep["name"] == expected_name(flow.name), (file, dep["entrypoint"], dep["name"])
        assert dep.get("description"), (file, dep["name"])
        assert flow.description, flow.name
        full.append(f"{flow.name}/{dep['name']}")
    assert len(set(full)) == len(full)
    assert names.deployment_name("bank", "txn") in full and names.sweeper_deployment() in full
    if file == "prefect.yaml":
        assert {names.intake_deployment(), names.submit_file_deployment()} <= set(full)


def test_served_deployments_are_named_after_their_flows(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.serve import example_deployments

    deps = example_deployments()
    full = {f"{d.flow_name}/{d.name}" for d in deps}
    assert full == {names.deployment_name("bank", "txn"), names.deployment_name("mail", "send"),
                    names.deployment_name("report", "summary"), names.sweeper_deployment(),
                    names.intake_deployment(), names.submit_file_deployment()}
    assert all(d.description for d in deps), [d.name for d in deps if not d.description]
