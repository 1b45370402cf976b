"""A simulated cluster: hosts (tests/support/netns.py), the services reachable from them, and alya workers
started on them the way a user starts them on a machine. Used by tests/integration/faults/test_multihost.py
and ``python -m bench scale``; later multi-host tests (per-app limits across machines, say) use the
``cluster`` fixture of test_multihost.py and its ``on_each_host`` / ``alya_worker`` / ``prefect_worker`` hooks.

What runs where::

    root namespace (the "service machine" and the operator's shell):
        relay  bridge-addr:P1 -> shared PostgreSQL 127.0.0.1:5432 (one database per test, cloned)
        relay  bridge-addr:P2 -> shared Redis 127.0.0.1:6379
        relay  bridge-addr:P3 -> the S3 server on loopback (weed mini), when given
        prefect server start --host bridge-addr      (PREFECT_HOME of its own)
    each host (a network namespace, its own hostname, its own PREFECT_HOME):
        prefect worker start --pool ...   or   alya worker MODULE:jm
        with ALYA_DATABASE_URL / ALYA_REDIS_URL / AWS_ENDPOINT_URL / PREFECT_API_URL on the bridge address

The test process itself (root namespace) talks to PostgreSQL, Redis and S3 on loopback as before, and to
Prefect at the bridge address.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from bench.common import wait_until
from tests.support import services
from tests.support.netns import Forwarder, Host, Proc, SimNet

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def wait_for(what: str, check: Callable[[], Any], timeout: float, procs: Sequence[Proc] = (),
             every: float = 0.2) -> Any:
    """Poll ``check`` until it returns something true; fail with the last value (and the logs of any of
    ``procs`` that died) after ``timeout`` seconds."""
    def died() -> str | None:
        dead = [p for p in procs if not p.running()]
        return f"{dead[0].args[-3:]} exited {dead[0].popen.returncode}\n{dead[0].tail()}" if dead else None

    return wait_until(what, check, timeout, every, died=died)


def _hostport(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def _replace_netloc(url: str, host: str, port: int) -> str:
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit((parts.scheme, f"{user}{host}:{port}", parts.path, parts.query, parts.fragment))


def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])


class Cluster:
    """``nhosts`` simulated hosts plus services on the bridge address. A context manager; everything it
    started is stopped on exit (also on failure), namespaces and links deleted.

    ``s3``: the dict of ``services.seaweed_s3()`` (relayed to the hosts), or None (then use a ``file://``
    object store: the hosts share this machine's file system). ``prefect``: start a Prefect server."""

    def __init__(self, workdir: Path, nhosts: int = 3, s3: dict[str, str] | None = None, prefect: bool = True,
                 pg_server: str = services.PG_SERVER, redis_url: str = services.REDIS_URL) -> None:
        self.workdir = workdir
        self.nhosts = nhosts
        self.s3 = s3
        self.with_prefect = prefect
        self.pg_server = pg_server.rstrip("/")
        self.redis_url = redis_url
        self.net = SimNet(nhosts)
        self.api_url = ""

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Cluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.net.__enter__()
        try:
            self._start()
        except BaseException:
            self.net.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.net.close()

    def _start(self) -> None:
        br = self.net.bridge_addr
        server = None
        if self.with_prefect:  # started first: it takes 5-12 s, the rest happens meanwhile
            port = _free_port(br)
            self.api_url = f"http://{br}:{port}/api"
            home = self.workdir / "prefect-server"
            home.mkdir(exist_ok=True)
            env = {**self.base_env(), "PREFECT_HOME": str(home), "PREFECT_API_URL": self.api_url,
                   "PREFECT_UI_ENABLED": "false"}
            server = self.net.spawn(None, [str(BIN / "prefect"), "server", "start", "--host", br, "--port",
                                           str(port)], env, self.workdir / "prefect-server.log", cwd=home)
        targets = [_hostport(self.pg_server, 5432), _hostport(self.redis_url, 6379)]
        if self.s3:
            targets.append(_hostport(self.s3["endpoint"], 80))
        fwd = Forwarder(self.net, targets, self.workdir / "relay.log")
        self.host_pg = _replace_netloc(self.pg_server, br, fwd.ports[0])
        self.host_redis = _replace_netloc(self.redis_url, br, fwd.ports[1])
        self.host_s3 = f"http://{br}:{fwd.ports[2]}" if self.s3 else ""
        for host in self.hosts:
            (self.workdir / host.name).mkdir(exist_ok=True)
        if server is not None:
            t0 = time.monotonic()
            wait_for("prefect server", lambda: httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200,
                     180, [server], every=0.3)
            print(f"prefect server on {self.api_url} up in {time.monotonic() - t0:.1f}s")

    # ------------------------------------------------------------------ addresses and environments
    @property
    def hosts(self) -> list[Host]:
        return self.net.hosts

    def database_url(self, database: str) -> str:
        """The database as seen from the test process (loopback)."""
        return f"{self.pg_server}/{database}"

    def host_database_url(self, database: str) -> str:
        """The database as seen from the hosts (through the relay on the bridge address)."""
        return f"{self.host_pg}/{database}"

    @staticmethod
    def base_env() -> dict[str, str]:
        """This process's environment without settings of its own (Prefect, alya, AWS)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ALYA_", "AWS_", "PYTEST_"))}
        env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1",
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="INFO")
        return env

    def host_env(self, host: Host, database: str, object_store_url: str = "", **extra: str) -> dict[str, str]:
        """What a user would export on that machine: the shared services' addresses and the alya settings."""
        env = self.base_env()
        env.update(ALYA_DATABASE_URL=self.host_database_url(database), ALYA_REDIS_URL=self.host_redis,
                   PREFECT_HOME=str(self.workdir / host.name / "prefect-home"))
        if object_store_url:
            env["ALYA_OBJECT_STORE_URL"] = object_store_url
        if self.api_url:
            env["PREFECT_API_URL"] = self.api_url
        if self.s3:
            env.update(AWS_ACCESS_KEY_ID=self.s3["key"], AWS_SECRET_ACCESS_KEY=self.s3["secret"],
                       AWS_ENDPOINT_URL=self.host_s3, AWS_DEFAULT_REGION="us-east-1")
        env.update(extra)
        return env

    # ------------------------------------------------------------------ processes on the hosts
    def spawn(self, host: Host, args: Sequence[str], name: str, env: dict[str, str]) -> Proc:
        """Run ``args`` on ``host`` from the repository top, output in ``<workdir>/<host>/<name>.log``."""
        return self.net.spawn(host, args, env, self.workdir / host.name / f"{name}.log", cwd=REPO)

    def on_each_host(self, args: Sequence[str], name: str, database: str, hosts: Sequence[Host] | None = None,
                     **env: str) -> list[Proc]:
        """The hook for anything to run across the hosts: ``args`` once on each host (all by default),
        with that host's environment plus ``env``."""
        return [self.spawn(h, args, name, self.host_env(h, database, **env)) for h in (hosts or self.hosts)]

    def alya_worker(self, host: Host, target: str, database: str, name: str = "alya-worker", **env: str) -> Proc:
        """``alya worker MODULE:jm`` on a host (in-process flows, ALYA_DISPATCH=none unless given)."""
        return self.spawn(host, [str(BIN / "alya"), "worker", target], name,
                          self.host_env(host, database, **{"ALYA_DISPATCH": "none", **env}))

    def prefect_worker(self, host: Host, pool: str, database: str, limit: int = 2, name: str = "", **env: str
                       ) -> Proc:
        """``prefect worker start --pool POOL`` on a host: the flow runs it picks up are its subprocesses,
        on that host, with this environment (set ALYA_DISPATCH=prefect as for the application)."""
        args = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--limit", str(limit),
                "--name", name or f"{pool}-{host.name}"]
        return self.spawn(host, args, "prefect-worker",
                          self.host_env(host, database, **{"PREFECT_WORKER_QUERY_SECONDS": "1", **env}))

    def wait_workers(self, database: str, n: int, timeout: float = 120, procs: Sequence[Proc] = ()) -> list[str]:
        """Wait until ``n`` alya workers have registered (heartbeat rows); returns their hosts."""
        url = self.database_url(database)
        rows = wait_for(f"{n} alya workers registered",
                        lambda: (r := services.sql(url, "SELECT host FROM workers")) and len(r) >= n and r,
                        timeout, procs)
        return sorted(h for (h,) in rows)
