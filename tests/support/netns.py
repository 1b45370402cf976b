"""Simulated hosts on one machine: Linux network namespaces on a private bridge, for the multi-host test
(tests/integration/faults/test_multihost.py) and the scale-out benchmark (``python -m bench scale``).

Why namespaces: each simulated host has its own network stack (its own loopback, address and routes), so
its processes reach the services only over the "network", and cutting that network (``Host.cut``, the
host-side veth link set down) is a real partition: packets vanish, TCP connections stall and retransmit,
nothing errors at once, just as when a machine's cable is pulled. Each process also gets its own UTS
namespace with the host's name, so ``socket.gethostname()`` (and so alya's worker ids and the ``workers``
table) tells the hosts apart.

Layout (one per run; names carry the creating process's pid, so two runs never collide and a crashed run's
leftovers are recognised and removed by the next run)::

    root namespace:  bridge alb<pid>, 10.231.X.1/24  (X: a /24 no interface here uses yet)
    host i:          namespace alya-<pid>-h<i>, eth0 10.231.X.(10+i)/24, default route via 10.231.X.1,
                     paired with veth alv<pid>h<i> in the root namespace, enslaved to the bridge

Services are reached at the bridge address. The shared PostgreSQL and Redis listen on 127.0.0.1 only (a
namespace cannot reach the root namespace's loopback) and must not be reconfigured or restarted, so a TCP
forwarder (``python -m tests.support.netns forward``, a small asyncio relay in its own process) listens on the bridge
address and relays to them; services a run starts itself (the Prefect server) bind the bridge address
directly. A forwarder rather than private PostgreSQL/Redis servers: no initdb (seconds, and a non-root user),
the template-database fixtures of the other tests keep working unchanged, and the relay is ~150 lines with
no dependency (socat would do the same, but is not everywhere). The relay sets TCP_NODELAY on both sides,
so it adds no Nagle delay to PostgreSQL's many small round trips.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import IO, Any

SUBNET_PREFIX = "10.231"  # a private /16 that nothing on these machines uses; one /24 per run
LOCK_FILE = Path("/tmp/alya-netns.lock")
NS_RE = re.compile(r"^alya-(\d+)-h\d+$")
LINK_RE = re.compile(r"^(?:alb(\d+)|alv(\d+)h\d+)(?:@\S+)?$")


# ---------------------------------------------------------------------------------------------- checks
def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@cache
def unavailable() -> str | None:
    """Why simulated hosts cannot be made here (a skip reason), or None when they can."""
    if not sys.platform.startswith("linux"):
        return "simulated hosts need Linux network namespaces"
    if os.geteuid() != 0:
        return "simulated hosts need root (ip netns add, ip link add)"
    for tool, pkg in (("ip", "iproute2"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (install {pkg})"
    probe = f"alya-{os.getpid()}-h99"
    try:
        _ip("netns", "add", probe)
        try:
            _ip("link", "add", f"alv{os.getpid()}h99", "type", "veth", "peer", "name", "eth0", "netns", probe)
            _ip("link", "del", f"alv{os.getpid()}h99")
            out = subprocess.run(["ip", "netns", "exec", probe, "unshare", "--uts", "--", "sh", "-c",
                                  'hostname "$0" && hostname', "alya-probe"],
                                 capture_output=True, text=True, timeout=30)
            if out.stdout.strip() != "alya-probe":
                return f"cannot set a hostname in a UTS namespace: {out.stderr.strip()[:200]}"
        finally:
            _ip("netns", "del", probe, check=False)
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        return f"cannot create network namespaces / veth links here: {str(detail).strip()[:200]}"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_processes(ns: str, grace: float = 5.0) -> None:
    """Every process still inside a namespace (flow-run subprocesses that left their group, say)."""
    def pids() -> list[int]:
        out = _ip("netns", "pids", ns, check=False).stdout.split()
        return [int(p) for p in out if p.isdigit()]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = pids()
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids() and time.monotonic() < deadline:
            time.sleep(0.1)


def remove_stale() -> list[str]:
    """Namespaces and links of runs whose process is gone (a run killed before its teardown)."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = NS_RE.match(name)
        if m and not _alive(int(m.group(1))):
            _kill_namespace_processes(name)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        m = LINK_RE.match(parts[1].strip())
        if m and not _alive(int(m.group(1) or m.group(2))):
            _ip("link", "del", parts[1].strip().split("@")[0], check=False)
            removed.append(parts[1].strip())
    return removed


@contextlib.contextmanager
def _global_lock() -> Iterator[None]:
    """Serialises subnet choice and creation across concurrent runs on this machine."""
    with open(LOCK_FILE, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _free_subnet() -> int:
    used = set()
    for line in _ip("-o", "-4", "addr", "show", check=False).stdout.splitlines():
        m = re.search(rf"inet {re.escape(SUBNET_PREFIX)}\.(\d+)\.", line)
        if m:
            used.add(int(m.group(1)))
    start = os.getpid() % 250
    for i in range(250):
        x = (start + i) % 250 + 1
        if x not in used:
            return x
    raise RuntimeError(f"no free /24 left in {SUBNET_PREFIX}.0.0/16")


# ---------------------------------------------------------------------------------------------- processes
class Proc:
    """A child process in its own session (so it and its children are stopped together, by its own
    process group id), with stdout and stderr in a log file."""

    def __init__(self, args: Sequence[str], env: dict[str, str], log: Path, cwd: Path | str | None = None) -> None:
        self.args = list(args)
        self.log = log
        self._fh: IO[bytes] = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(self.args, env=env, cwd=cwd, stdout=self._fh, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        else:  # the leader is gone; children of its group may not be
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        self._fh.close()


# ---------------------------------------------------------------------------------------------- hosts
@dataclass
class Host:
    name: str  # its hostname (socket.gethostname() inside)
    ns: str  # network namespace
    addr: str  # its address on the bridge
    veth: str  # the root-namespace end of its link: down = the host is cut off

    def wrap(self, args: Sequence[str]) -> list[str]:
        """``args`` run inside this host: its network namespace and a UTS namespace with its hostname."""
        return ["ip", "netns", "exec", self.ns, "unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"',
                self.name, *args]

    def cut(self) -> None:
        """Pull the cable: the link goes down on the switch side, packets are dropped silently."""
        _ip("link", "set", self.veth, "down")

    def restore(self) -> None:
        _ip("link", "set", self.veth, "up")

    def is_cut(self) -> bool:
        flags = re.search(r"<([^>]*)>", _ip("link", "show", self.veth).stdout)
        return flags is None or "UP" not in flags.group(1).split(",")


@dataclass
class SimNet:
    """``nhosts`` simulated hosts on a bridge. Use as a context manager; teardown stops every process it
    started, kills whatever is still inside the namespaces, and deletes namespaces, links and bridge, also
    when the body failed."""

    nhosts: int = 3
    names: Sequence[str] = ()
    hosts: list[Host] = field(default_factory=list)
    bridge: str = ""
    bridge_addr: str = ""
    procs: list[Proc] = field(default_factory=list)

    def __enter__(self) -> SimNet:
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        pid = os.getpid()
        try:
            with _global_lock():
                remove_stale()
                x = _free_subnet()
                self.bridge = f"alb{pid}"
                self.bridge_addr = f"{SUBNET_PREFIX}.{x}.1"
                _ip("link", "add", self.bridge, "type", "bridge")
                _ip("addr", "add", f"{self.bridge_addr}/24", "dev", self.bridge)
                _ip("link", "set", self.bridge, "up")
            names = list(self.names) or [f"sim-{chr(ord('a') + i)}" for i in range(self.nhosts)]
            for i, name in enumerate(names[: self.nhosts], start=1):
                host = Host(name=name, ns=f"alya-{pid}-h{i}", addr=f"{SUBNET_PREFIX}.{x}.{10 + i}",
                            veth=f"alv{pid}h{i}")
                _ip("netns", "add", host.ns)
                self.hosts.append(host)
                _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
                _ip("link", "set", host.veth, "master", self.bridge, "up")
                _ip("-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
                _ip("-n", host.ns, "link", "set", "eth0", "up")
                _ip("-n", host.ns, "link", "set", "lo", "up")
                _ip("-n", host.ns, "route", "add", "default", "via", self.bridge_addr)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def spawn(self, host: Host | None, args: Sequence[str], env: dict[str, str], log: Path,
              cwd: Path | str | None = None) -> Proc:
        """Start ``args`` on ``host`` (None: in the root namespace, like the services)."""
        proc = Proc(host.wrap(args) if host else args, env, log, cwd)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        self.procs.clear()
        for host in self.hosts:
            with contextlib.suppress(Exception):
                _kill_namespace_processes(host.ns)
            _ip("netns", "del", host.ns, check=False)  # deletes its eth0, and so its veth peer
            _ip("link", "del", host.veth, check=False)
        self.hosts.clear()
        if self.bridge:
            _ip("link", "del", self.bridge, check=False)
            self.bridge = ""


# ---------------------------------------------------------------------------------------------- forwarder
class Forwarder:
    """TCP relays from the bridge address to services on loopback, in a child process."""

    def __init__(self, net: SimNet, targets: Sequence[tuple[str, int]], log: Path) -> None:
        args = [sys.executable, "-m", "tests.support.netns", "forward", net.bridge_addr,
                *[f"{h}:{p}" for h, p in targets]]
        self.proc = net.spawn(None, args, {**os.environ, "PYTHONUNBUFFERED": "1"}, log,
                              cwd=Path(__file__).resolve().parents[2])
        deadline = time.monotonic() + 30
        self.ports: list[int] = []
        while time.monotonic() < deadline:
            for line in self.proc.tail(100_000).splitlines():
                if line.startswith("{"):
                    self.ports = json.loads(line)["ports"]
                    return
            if not self.proc.running():
                break
            time.sleep(0.05)
        raise RuntimeError(f"forwarder did not start: {self.proc.tail()}")


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _serve(listen: str, targets: list[tuple[str, int]]) -> None:
    servers = []
    for host, port in targets:
        async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter, host: str = host,
                         port: int = port) -> None:
            try:
                ur, uw = await asyncio.open_connection(host, port)
            except OSError:
                cw.close()
                return
            _nodelay(cw)
            _nodelay(uw)
            # Either side closing closes both: PostgreSQL, Redis and HTTP never half-close.
            await asyncio.gather(_relay(cr, uw), _relay(ur, cw))

        servers.append(await asyncio.start_server(handle, listen, 0, reuse_address=True))
    print(json.dumps({"ports": [s.sockets[0].getsockname()[1] for s in servers]}), flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def _parse_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="TCP relays for simulated hosts")
    sub = parser.add_subparsers(dest="cmd", required=True)
    fwd = sub.add_parser("forward", help="listen on ADDR (one free port per target) and relay to each target")
    fwd.add_argument("addr")
    fwd.add_argument("targets", nargs="+", help="host:port")
    sub.add_parser("check", help="print why simulated hosts cannot be made here, or 'ok'")
    sub.add_parser("cleanup", help="remove namespaces and links of runs that are gone")
    args = parser.parse_args(argv)
    if args.cmd == "forward":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        asyncio.run(_serve(args.addr, [_parse_target(t) for t in args.targets]))
    elif args.cmd == "check":
        print(unavailable() or "ok")
    else:
        with _global_lock():
            print("\n".join(remove_stale()) or "nothing stale")


if __name__ == "__main__":
    main()
