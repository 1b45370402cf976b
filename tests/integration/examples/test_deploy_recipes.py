"""The container recipes in deployments/, checked as far as this machine allows (no Docker engine, no
Kubernetes cluster): the docker and kubernetes work pools and their deployments are created on a real
``prefect server start`` with ``deployments/deploy.sh``, exactly as the recipes say, and what the server
stored is checked (pool types and templates, image, env, resources, pull step, entrypoints, schedule). The
server validates job variables against the pool's schema, so a mistyped value fails the deploy; a
misspelt variable name is caught here. The Dockerfile is checked for what it copies and where it puts it;
it is never built here. Nothing runs a container: that part is untested.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.prefect_server import PREFECT, REPO, api, base_env, client, prefect_server

pytestmark = pytest.mark.slow

DEPLOYMENTS = REPO / "deployments"
IMAGE = "registry.example.com/alya-worker:0.1.0"


def dockerfile() -> tuple[str, list[str]]:
    """The Dockerfile's WORKDIR and the sources it copies."""
    text = (DEPLOYMENTS / "Dockerfile").read_text()
    workdir = re.findall(r"^WORKDIR\s+(\S+)", text, re.M)[-1]
    sources = [src for line in re.findall(r"^COPY\s+(.+)$", text, re.M) for src in line.split()[:-1]]
    return workdir, sources


def test_dockerfile_copies_what_the_flows_need() -> None:
    workdir, sources = dockerfile()
    for src in sources:
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    ignored = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert not ignored & set(sources), ignored & set(sources)
    # the flows' entrypoints (flows/...py) resolve from the pull step's directory, the image's WORKDIR
    assert {"alya", "flows", "migrations", "pyproject.toml"} <= set(sources)
    for name in ("prefect.docker.yaml", "prefect.kubernetes.yaml"):
        spec = yaml.safe_load((DEPLOYMENTS / name).read_text())
        (step,) = spec["pull"]
        assert step["prefect.deployments.steps.set_working_directory"]["directory"] == workdir, name


def deploy(tmp_path: Path, url: str, pool: str, pool_type: str, prefect_file: str, template: str = "") -> None:
    env = base_env(tmp_path / "prefect-home", url, PREFECT=PREFECT, ALYA_POOL=pool, ALYA_POOL_TYPE=pool_type,
                   ALYA_POOL_TEMPLATE=template, ALYA_IMAGE=IMAGE,
                   ALYA_DATABASE_URL="postgresql://alya@pg.internal:5432/alya",
                   ALYA_REDIS_URL="redis://redis.internal:6379/0", ALYA_OBJECT_STORE_URL="s3://alya-outputs/batches",
                   AWS_ENDPOINT_URL="https://s3.internal")
    out = subprocess.run(["bash", "deployments/deploy.sh", "--prefect-file", prefect_file], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def stored(pool: str) -> tuple[Any, dict[str, Any]]:
    with client() as c:
        wp = c.read_work_pool(pool)
        deps = {f"{c.read_flow(d.flow_id).name}/{d.name}": d for d in c.read_deployments()
                if d.work_pool_name == pool}
    return wp, deps


def check_common(wp: Any, deps: dict[str, Any], pool_type: str) -> None:
    assert wp.type == pool_type
    assert set(deps) == {"alya-bank-txn/bank-txn", "alya-mail-send/mail-send", "alya-report-summary/report-summary",
                         "alya-sweeper/sweeper"}
    known = set(wp.base_job_template["variables"]["properties"])
    expected_entry = {f"{Path(d['entrypoint'].split(':')[0]).stem}": d["entrypoint"]
                      for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    for name, dep in deps.items():
        jv = dep.job_variables
        assert set(jv) <= known, f"{name}: job variables unknown to a {pool_type} pool: {set(jv) - known}"
        assert jv["image"] == IMAGE
        assert jv["env"]["ALYA_DISPATCH"] == "prefect" and jv["env"]["ALYA_RECOVERY_SEC"] == "60"
        assert jv["env"]["ALYA_OBJECT_STORE_URL"] == "s3://alya-outputs/batches"
        assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/alya"}}]
        assert dep.entrypoint == expected_entry[Path(dep.entrypoint.split(":")[0]).stem]  # same as prefect.yaml
    sweeper = deps["alya-sweeper/sweeper"]
    assert [s.schedule.interval.total_seconds() for s in sweeper.schedules] == [300.0]


def test_docker_and_kubernetes_pools_deploy(tmp_path: Path) -> None:
    with prefect_server(tmp_path) as url, api(url):
        deploy(tmp_path, url, "alya-docker", "docker", "deployments/prefect.docker.yaml")
        wp, deps = stored("alya-docker")
        check_common(wp, deps, "docker")
        bank = deps["alya-bank-txn/bank-txn"].job_variables
        assert bank["mem_limit"] == "1g" and bank["auto_remove"] is True
        assert bank["env"]["ALYA_DATABASE_URL"] == "postgresql://alya@pg.internal:5432/alya"
        assert deps["alya-sweeper/sweeper"].job_variables["mem_limit"] == "512m"

        # the same deployment names (the Dispatcher's), now on the kubernetes pool: a site uses one of the two
        deploy(tmp_path, url, "alya-k8s", "kubernetes", "deployments/prefect.kubernetes.yaml",
               "deployments/kubernetes-job-template.json")
        wp, deps = stored("alya-k8s")
        check_common(wp, deps, "kubernetes")
        bank = deps["alya-bank-txn/bank-txn"].job_variables
        assert (bank["cpu_request"], bank["cpu_limit"], bank["memory_request"], bank["memory_limit"]) == \
            ("500m", "2", "512Mi", "1Gi")
        assert bank["namespace"] == "alya" and bank["settings_secret"] == "alya-settings"
        assert "ALYA_DATABASE_URL" not in bank["env"]  # credentials come from the Secret, not from Prefect
        manifest = wp.base_job_template["job_configuration"]["job_manifest"]
        (container,) = manifest["spec"]["template"]["spec"]["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": "{{ settings_secret }}"}}]
        assert container["resources"]["limits"] == {"cpu": "{{ cpu_limit }}", "memory": "{{ memory_limit }}"}
        # the template in the repository is the one the pool got
        assert wp.base_job_template == json.loads((DEPLOYMENTS / "kubernetes-job-template.json").read_text())
