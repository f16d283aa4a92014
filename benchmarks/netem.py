"""Emulated slow links for distributed benchmarks: one network namespace per worker, a switch, tc.

Needs root (``ip netns``, veth pairs, a bridge and ``tc``). Every object lives in
namespaces this module creates and names ``istfx-tta-*``, so nothing outside
them is touched::

    istfx-tta-w0 (eth0 10.77.0.1) --veth-- p0 [istfx-tta-sw: bridge br0] p1 --veth-- (eth0 10.77.0.2) istfx-tta-w1

Each worker's link is shaped in both directions with a token bucket
(``tc qdisc ... tbf rate R``): on the worker's ``eth0`` (what it sends) and on
its switch port (what it receives), as a host with an R Mbit/s NIC on a
switch. Latency is not emulated: this kernel has no ``netem`` qdisc; the
measured round trip (a few tens of microseconds) is reported instead.

Usage::

    with EmulatedNetwork(workers=4, rate="100mbit") as net:
        proc = net.popen(0, [sys.executable, "worker.py"], env={"MASTER_ADDR": net.address(0)})
        print(net.measure())              # {'throughput_mbit': ..., 'rtt_ms': ...}

The namespaces are removed on exit, on SIGINT/SIGTERM/SIGHUP (the handlers
raise, so ``finally`` blocks run; processes started with :meth:`popen` are
stopped first), and at the start of the next run should a run have been
killed outright. From the command line::

    sudo python benchmarks/netem.py --selftest --workers 2 --rate 100mbit   # throughput and RTT
    sudo python benchmarks/netem.py --cleanup                                # remove leftovers
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

__all__ = ["EmulatedNetwork", "NetworkError", "cleanup", "leftover_namespaces", "parse_rate", "rate_label",
           "require_root", "setup_commands"]

PREFIX = "istfx-tta"
SUBNET = "10.77.0"
IFACE = "eth0"


class NetworkError(RuntimeError):
    """The emulated network cannot be built (no root, no ip/tc, a command failed)."""


# -- pure helpers (no side effects) --------------------------------------------------------------------
_UNITS = {"bit": 1, "kbit": 10 ** 3, "mbit": 10 ** 6, "gbit": 10 ** 9}


def parse_rate(text: str) -> int | None:
    """``"100mbit"`` -> 100_000_000 bits/s; ``"none"`` (no shaping) -> None. Decimal units, as tc reads them."""
    value = str(text).strip().lower()
    if value in ("none", "unlimited", "off"):
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)", value)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"link rate {text!r}: use a positive number with a unit, e.g. 100mbit or 1gbit, or none")
    return int(round(float(match.group(1)) * _UNITS[match.group(2)]))


def rate_label(bits: int | None) -> str:
    """A short label for a rate in bits/s: ``100mbit``, ``1gbit``, ``none``."""
    if bits is None:
        return "none"
    for unit in ("gbit", "mbit", "kbit"):
        if bits % _UNITS[unit] == 0:
            return f"{bits // _UNITS[unit]}{unit}"
    return f"{bits}bit"


def namespaces(workers: int, prefix: str = PREFIX) -> tuple[str, list[str]]:
    """(switch namespace, one namespace per worker)."""
    return f"{prefix}-sw", [f"{prefix}-w{k}" for k in range(workers)]


def address(rank: int) -> str:
    """The IPv4 address of worker `rank` inside its namespace."""
    if not 0 <= rank < 250:
        raise ValueError(f"worker rank {rank} out of range 0..249")
    return f"{SUBNET}.{rank + 1}"


def tbf(bits: int) -> list[str]:
    """tc arguments of a token bucket at `bits`/s.

    The bucket holds 2 ms of traffic (at least 64 KiB, so a segmentation
    offload burst fits) and the queue up to 20 ms: enough for TCP to fill
    the link, little enough not to add a standing delay of its own.
    """
    burst = max(64 * 1024, bits // 8 // 500)
    return ["tbf", "rate", f"{bits}bit", "burst", str(burst), "latency", "20ms"]


def setup_commands(workers: int, rate_bits: int | None, prefix: str = PREFIX) -> list[list[str]]:
    """The ``ip``/``tc`` commands that build the network, in order."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    switch, spaces = namespaces(workers, prefix)
    cmds = [["ip", "netns", "add", switch],
            ["ip", "-n", switch, "link", "add", "br0", "type", "bridge"],
            ["ip", "-n", switch, "link", "set", "br0", "up"]]
    for k, space in enumerate(spaces):
        port = f"p{k}"
        cmds += [
            ["ip", "netns", "add", space],
            # Both ends are created inside their namespaces: nothing ever exists outside them.
            ["ip", "link", "add", "name", IFACE, "netns", space, "type", "veth", "peer", "name", port,
             "netns", switch],
            ["ip", "-n", switch, "link", "set", port, "master", "br0"],
            ["ip", "-n", switch, "link", "set", port, "up"],
            ["ip", "-n", space, "addr", "add", f"{address(k)}/24", "dev", IFACE],
            ["ip", "-n", space, "link", "set", IFACE, "up"],
            ["ip", "-n", space, "link", "set", "lo", "up"],
        ]
        if rate_bits is not None:
            cmds += [["ip", "netns", "exec", space, "tc", "qdisc", "add", "dev", IFACE, "root", *tbf(rate_bits)],
                     ["ip", "netns", "exec", switch, "tc", "qdisc", "add", "dev", port, "root", *tbf(rate_bits)]]
    return cmds


def leftover_namespaces(listing: str, prefix: str = PREFIX) -> list[str]:
    """Names in ``ip netns list`` output that this module created (``PREFIX-sw``, ``PREFIX-w<k>``)."""
    pattern = re.compile(rf"{re.escape(prefix)}-(sw|w\d+)")
    names = []
    for line in listing.splitlines():
        fields = line.split()
        if fields and pattern.fullmatch(fields[0]):
            names.append(fields[0])
    return names


# -- side effects ------------------------------------------------------------------------------------
def require_root() -> None:
    """Raise :class:`NetworkError` unless this process can build namespaces (root, ip and tc present)."""
    if os.geteuid() != 0:
        raise NetworkError("emulated links need root (network namespaces, veth pairs, tc): run this benchmark "
                           "as root, e.g. `sudo .venv/bin/python benchmarks/time_to_accuracy.py ...`")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetworkError(f"`{tool}` not found: install iproute2")


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetworkError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def cleanup(prefix: str = PREFIX) -> list[str]:
    """Delete every namespace this module created (their veths, bridge and qdiscs go with them)."""
    listing = _run(["ip", "netns", "list"], check=False).stdout
    removed = []
    for name in leftover_namespaces(listing, prefix):
        for pid in _run(["ip", "netns", "pids", name], check=False).stdout.split():
            try:  # processes left in the namespace keep it alive
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        if _run(["ip", "netns", "delete", name], check=False).returncode == 0:
            removed.append(name)
    return removed


_PROBE = r"""
import socket, sys, time
role, host, nbytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
if role == "server":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((host, 5999)); s.listen(1)
    print("ready", flush=True)
    c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(50):
        c.sendall(c.recv(1))
    got = 0
    while got < nbytes:
        got += len(c.recv(1 << 20))
    c.sendall(b"k")
else:
    c = socket.create_connection((host, 5999)); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(50):
        t = time.perf_counter(); c.sendall(b"x"); c.recv(1); rtts.append(time.perf_counter() - t)
    block, left = b"\0" * (1 << 20), nbytes
    t = time.perf_counter()
    while left:
        n = min(left, len(block)); c.sendall(block[:n]); left -= n
    c.recv(1)
    seconds = time.perf_counter() - t
    rtts.sort()
    print(f"{nbytes * 8 / seconds / 1e6:.2f} {rtts[len(rtts) // 2] * 1e3:.4f}", flush=True)
"""


class EmulatedNetwork:
    """A switch and `workers` namespaces joined by links shaped to `rate` (see the module docstring).

    Args:
        workers: worker namespaces (ranks 0..workers-1).
        rate: link rate per direction, e.g. ``"100mbit"``; ``"none"`` for unshaped veths.
        prefix: namespace name prefix (leftovers with it are removed on start).
    """

    def __init__(self, workers: int, rate: str = "100mbit", prefix: str = PREFIX) -> None:
        self.workers = int(workers)
        self.rate_bits = parse_rate(rate)
        self.prefix = prefix
        self.switch, self.spaces = namespaces(self.workers, prefix)
        self.processes: list[subprocess.Popen] = []
        self._handlers: dict[int, object] = {}
        self._up = False

    # -- life cycle ------------------------------------------------------------------------------------
    def __enter__(self) -> EmulatedNetwork:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Remove leftovers of an earlier run, build the network, arm the signal handlers."""
        require_root()
        self._arm()
        atexit.register(self.close)
        cleanup(self.prefix)
        self._up = True
        for cmd in setup_commands(self.workers, self.rate_bits, self.prefix):
            _run(cmd)

    def close(self) -> None:
        """Stop the processes started here and delete the namespaces (idempotent)."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5.0
        for proc in self.processes:
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.processes.clear()
        if self._up:
            cleanup(self.prefix)
            self._up = False
        self._disarm()

    def _arm(self) -> None:
        def stop(signum, frame):
            raise SystemExit(128 + signum)

        for signum in (signal.SIGTERM, signal.SIGHUP):
            try:
                self._handlers[signum] = signal.signal(signum, stop)
            except ValueError:  # not the main thread: the caller cleans up
                pass

    def _disarm(self) -> None:
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers.clear()

    # -- use -------------------------------------------------------------------------------------------
    def address(self, rank: int) -> str:
        """Worker `rank`'s address (reachable from every worker namespace)."""
        return address(rank)

    @property
    def iface(self) -> str:
        """The interface name inside every worker namespace (for ``GLOO_SOCKET_IFNAME``)."""
        return IFACE

    def popen(self, rank: int, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside worker `rank`'s namespace; it is stopped on :meth:`close`."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.spaces[rank], *argv], **kwargs)
        self.processes.append(proc)
        return proc

    def port_counters(self) -> list[dict[str, int]]:
        """Per worker, the bytes its switch port carried: ``{"to_worker": ..., "from_worker": ...}``."""
        out = json.loads(_run(["ip", "-n", self.switch, "-s", "-j", "link", "show"]).stdout)
        stats = {entry["ifname"]: entry["stats64"] for entry in out}
        return [{"to_worker": int(stats[f"p{k}"]["tx"]["bytes"]), "from_worker": int(stats[f"p{k}"]["rx"]["bytes"])}
                for k in range(self.workers)]

    def measure(self, nbytes: int | None = None) -> dict[str, float]:
        """TCP throughput and median round trip from worker 0 to worker 1, measured now."""
        if self.workers < 2:
            raise NetworkError("measure() needs two workers")
        if nbytes is None:  # about half a second of traffic at the link rate
            nbytes = max(4 << 20, (self.rate_bits or 8 * 10 ** 9) // 16)
        server = self.popen(1, [sys.executable, "-c", _PROBE, "server", address(1), str(nbytes)],
                            stdout=subprocess.PIPE, text=True)
        try:
            server.stdout.readline()  # "ready"
            client = subprocess.run(["ip", "netns", "exec", self.spaces[0], sys.executable, "-c", _PROBE, "client",
                                     address(1), str(nbytes)], capture_output=True, text=True, timeout=120)
            if client.returncode != 0:
                raise NetworkError(f"link probe failed: {client.stderr.strip()}")
            mbit, rtt = (float(v) for v in client.stdout.split())
        finally:
            server.wait(timeout=30)
        return {"throughput_mbit": mbit, "rtt_ms": rtt, "probe_bytes": nbytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] + " Needs root.")
    parser.add_argument("--selftest", action="store_true", help="build the network, measure a link, tear down")
    parser.add_argument("--cleanup", action="store_true", help="remove namespaces left by a killed run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", default="100mbit")
    args = parser.parse_args(argv)
    try:
        require_root()
        if args.cleanup:
            print("removed:", " ".join(cleanup()) or "nothing")
        if args.selftest:
            with EmulatedNetwork(args.workers, args.rate) as net:
                print(f"{args.workers} workers, links {args.rate}:", net.measure())
    except NetworkError as exc:
        print(f"netem: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
