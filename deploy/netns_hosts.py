"""Hosts on a real network, on one Linux machine: each "host" is a network namespace with its
own address (10.231.0.N/24), its own hostname (a UTS namespace per process started in it) and a
link whose bandwidth is capped both ways (`tc ... tbf`), joined by a bridge in a namespace of its
own. Every packet stays inside these namespaces. A Ray cluster can then run with its head on
host 0 and a node on each other host: chainrule sees different hosts and moves gradients and
parameters over direct connections between its workers and shards (or Ray's object store) over
the capped links, as on a real cluster.

    sudo python deploy/netns_hosts.py up 3 --rate 1gbit --ray     # prints the Ray address
    sudo python deploy/netns_hosts.py run 0 -- python -m services.cli train SPEC \\
        --ray-address 10.231.0.1:6379                               # a command on host 0
    sudo python deploy/netns_hosts.py down

Needs root (ip netns, tc). The tests use the same classes (tests/multihost/conftest.py).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

STATE_FILE = Path(tempfile.gettempdir()) / "chainrule-netns-hosts.json"
SUBNET = "10.231.0"
INTERFACE = "eth0"  # every host's one link has this name (in its own namespace), as on a real
# cluster's machines: PyTorch's gloo picks its interface by name (GLOO_SOCKET_IFNAME)
RAY_PORT = 6379
NODES_LINE = "chainrule-nodes: "  # marks the node probe's answer among what Ray prints


def _ip(*arguments: str) -> None:
    subprocess.run(["ip", *arguments], check=True, capture_output=True, text=True)


class Hosts:
    """`count` namespaces named `{prefix}-h{i}` plus `{prefix}-sw` holding the bridge."""

    def __init__(self, count: int, rate: str = "1gbit", prefix: str = ""):
        if not 1 <= count <= 200:
            raise ValueError(f"count must be 1-200, got {count}")
        self.count = count
        self.rate = rate
        self.prefix = prefix or f"cr{secrets.token_hex(2)}"

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def namespace(self, host: int) -> str:
        return f"{self.prefix}-h{host}"

    def hostname(self, host: int) -> str:
        return f"{self.prefix}-host{host}"

    def address(self, host: int) -> str:
        return f"{SUBNET}.{host + 1}"

    def up(self) -> Hosts:
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "set", "lo", "up")
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for host in range(self.count):
                ns, inside, outside = self.namespace(host), INTERFACE, f"port{host}"
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                # Both ends made inside the namespaces: the root namespace never sees them.
                _ip("-n", ns, "link", "add", inside, "type", "veth", "peer", "name", outside,
                    "netns", self.switch)
                _ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", inside)
                _ip("-n", ns, "link", "set", inside, "up")
                _ip("-n", self.switch, "link", "set", outside, "master", "br0")
                _ip("-n", self.switch, "link", "set", outside, "up")
                # The host's uplink and downlink, each capped (netem is not on these kernels).
                for namespace, device in ((ns, inside), (self.switch, outside)):
                    subprocess.run(["ip", "netns", "exec", namespace, "tc", "qdisc", "add",
                                    "dev", device, "root", "tbf", "rate", self.rate, "burst",
                                    "256kb", "latency", "100ms"], check=True,
                                   capture_output=True, text=True)
        except BaseException:
            self.down()
            raise
        return self

    def command(self, host: int, argv: Sequence[str]) -> list[str]:
        """argv run on `host`: in its namespace, under its own hostname."""
        return ["ip", "netns", "exec", self.namespace(host), "unshare", "--uts", "sh", "-c",
                f"hostname {shlex.quote(self.hostname(host))} && exec \"$@\"", "sh", *argv]

    def start(self, host: int, argv: Sequence[str], env: Mapping[str, str] | None = None,
              **options) -> subprocess.Popen:
        return subprocess.Popen(self.command(host, argv), env={**os.environ, **(env or {})},
                                start_new_session=True, **options)

    def run(self, host: int, argv: Sequence[str], env: Mapping[str, str] | None = None,
            timeout: float | None = None, **options) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, argv), env={**os.environ, **(env or {})},
                              timeout=timeout, **options)

    def pids(self, host: int) -> list[int]:
        done = subprocess.run(["ip", "netns", "pids", self.namespace(host)],
                              capture_output=True, text=True)
        return [int(pid) for pid in done.stdout.split()]

    def down(self) -> None:
        """Kill every process in the namespaces, then delete them (idempotent)."""
        namespaces = [self.namespace(host) for host in range(self.count)] + [self.switch]
        for _ in range(3):
            pids = [pid for ns in namespaces for pid in _pids_in(ns)]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        for ns in namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _pids_in(namespace: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    return [int(pid) for pid in done.stdout.split()]


class RayOnHosts:
    """A Ray head on host 0 and one node on every other host, with token authentication (a
    token made here, given to every node and to the drivers through `env`)."""

    def __init__(self, hosts: Hosts, cpus_per_host: int = 1):
        self.hosts = hosts
        self.cpus_per_host = cpus_per_host
        self.token = secrets.token_hex(32)
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"{hosts.prefix}-ray-"))
        self.processes: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"{self.hosts.address(0)}:{RAY_PORT}"

    @property
    def env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                "RAY_USAGE_STATS_ENABLED": "0", "GLOO_SOCKET_IFNAME": INTERFACE}

    def _ray_start(self, host: int, *extra: str) -> subprocess.Popen:
        ray = str(Path(sys.executable).with_name("ray"))
        argv = [ray, "start", "--block", f"--node-ip-address={self.hosts.address(host)}",
                f"--num-cpus={self.cpus_per_host}", "--disable-usage-stats", *extra]
        log = open(self.temp_dir / f"host{host}.log", "wb")  # noqa: SIM115 (the child keeps it)
        return self.hosts.start(host, argv, self.env, stdout=log, stderr=subprocess.STDOUT)

    def up(self, timeout: float = 120.0) -> RayOnHosts:
        try:
            self.processes.append(self._ray_start(
                0, "--head", f"--port={RAY_PORT}", "--include-dashboard=false",
                f"--temp-dir={self.temp_dir}"))
            self._wait_until_started([0], timeout)
            for host in range(1, self.hosts.count):  # one at a time: a busy GCS and raylet
                # each get Ray's fixed 30 s to register a node
                self.processes.append(self._ray_start(host, f"--address={self.address}"))
                self._wait_until_started([host], timeout)
            self.wait_for_nodes(self.hosts.count, timeout)
        except BaseException:
            self.down()
            raise
        return self

    def alive_nodes(self, timeout: float = 60.0) -> list[dict]:
        """The cluster's live nodes, as a driver on host 0 sees them."""
        probe = (f"import json, ray; ray.init(address={self.address!r}, log_to_driver=False); "
                 f"print({NODES_LINE!r} + json.dumps([{{'host': n['NodeManagerHostname'], 'ip': "
                 "n['NodeManagerAddress']} for n in ray.nodes() if n['Alive']]))")
        done = self.hosts.run(0, [sys.executable, "-c", probe], self.env, timeout=timeout,
                              capture_output=True, text=True)
        # Ray may print after the probe's line (seen at load 38), so the line is found by its
        # mark, not by being last.
        lines = [line for line in done.stdout.splitlines() if line.startswith(NODES_LINE)]
        if done.returncode != 0 or not lines:
            return []
        return json.loads(lines[-1][len(NODES_LINE):])

    def _wait_until_started(self, hosts: Iterable[int], timeout: float) -> None:
        """Until each host's `ray start` says its node runs (cheaper than a driver's probe,
        which takes seconds to connect)."""
        deadline = time.monotonic() + timeout
        for host in hosts:
            log = self.temp_dir / f"host{host}.log"
            while b"Ray runtime started" not in log.read_bytes():
                if self.processes[host].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Ray on host {host} did not start:\n"
                                       f"{log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.2)

    def wait_for_nodes(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.alive_nodes()) >= count:
                return
            if any(process.poll() is not None for process in self.processes):
                logs = "\n".join(path.read_text(errors="replace")[-2000:]
                                 for path in self.temp_dir.glob("host*.log"))
                raise RuntimeError(f"a Ray node exited while starting:\n{logs}")
            time.sleep(1.0)
        raise TimeoutError(f"fewer than {count} Ray nodes alive after {timeout:g} s")

    def restart_node(self, host: int, timeout: float = 120.0) -> None:
        """Start `host`'s Ray node again after it was killed (not the head's): every process
        left in its namespace is killed first, then a new node joins the head."""
        if host == 0:
            raise ValueError("host 0 runs the head; restart the whole cluster instead")
        for pid in self.hosts.pids(host):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.processes[host].wait(timeout=30)
        (self.temp_dir / f"host{host}.log").unlink(missing_ok=True)
        self.processes[host] = self._ray_start(host, f"--address={self.address}")
        self._wait_until_started([host], timeout)
        self.wait_for_nodes(self.hosts.count, timeout)

    def raylet_pid(self, host: int) -> int:
        """The raylet of `host`'s node (a process in its namespace)."""
        for pid in self.hosts.pids(host):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                    return pid
            except OSError:
                continue
        raise LookupError(f"no raylet on host {host}")

    def down(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        for process in self.processes:
            process.wait(timeout=30)
        self.processes.clear()
        # Every Ray process of these nodes lives in the hosts' namespaces: Hosts.down() kills
        # what is left. `ray start` also records the head for `ray.init(address="auto")`.
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        try:
            if self.address in current.read_text():
                current.unlink()
        except OSError:
            pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # the nodes' logs and Ray's session


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    up = verbs.add_parser("up", help="make the hosts (and a Ray cluster on them with --ray)")
    up.add_argument("count", type=int)
    up.add_argument("--rate", default="1gbit", help="each link's cap, both ways (tc units)")
    up.add_argument("--ray", action="store_true", help="start a Ray node on every host")
    up.add_argument("--cpus-per-host", type=int, default=1)
    run = verbs.add_parser("run", help="run a command on a host (with the Ray token's env)")
    run.add_argument("host", type=int)
    run.add_argument("argv", nargs=argparse.REMAINDER)
    verbs.add_parser("down", help="stop everything on the hosts and delete them")
    args = parser.parse_args(argv)

    if args.verb == "up":
        if STATE_FILE.exists():  # a second set would share the addresses and be forgotten
            state = json.loads(STATE_FILE.read_text())
            print(f"hosts {state['prefix']}-* are up already: `{sys.argv[0]} down` first",
                  file=sys.stderr)
            return 2
        hosts = Hosts(args.count, args.rate).up()
        state = {"count": hosts.count, "rate": hosts.rate, "prefix": hosts.prefix, "env": {},
                 "ray_temp_dir": ""}
        if args.ray:
            ray = RayOnHosts(hosts, args.cpus_per_host).up()
            state["env"], state["ray_temp_dir"] = ray.env, str(ray.temp_dir)
            print(f"Ray cluster at {ray.address}: run drivers on host 0 with "
                  f"`{sys.argv[0]} run 0 -- COMMAND`")
        STATE_FILE.write_text(json.dumps(state))
        os.chmod(STATE_FILE, 0o600)  # it holds the cluster's token
        print(f"{hosts.count} hosts {hosts.address(0)}..{hosts.address(hosts.count - 1)}, "
              f"{hosts.rate} each way")
        return 0
    if not STATE_FILE.exists():
        print(f"no hosts are up (no {STATE_FILE}): `{sys.argv[0]} up N` first", file=sys.stderr)
        return 2
    state = json.loads(STATE_FILE.read_text())
    hosts = Hosts(state["count"], state["rate"], state["prefix"])
    if args.verb == "run":
        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        return hosts.run(args.host, command, state["env"]).returncode
    hosts.down()
    if state.get("ray_temp_dir"):
        shutil.rmtree(state["ray_temp_dir"], ignore_errors=True)
    STATE_FILE.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
