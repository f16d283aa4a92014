"""The control plane of a local `istfx train`: nothing listens beyond 127.0.0.1, and a taken port fails fast.

Rank 0's rendezvous store (on ``--master-port``) and gloo's sockets of every
rank must listen on the loopback address only while a job runs (checked in
``/proc/net/tcp{,6}`` against the ranks' own socket inodes); a
``--master-port`` another process holds ends the command within seconds with
a message naming the port.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import descendant_pids
from istfx.errors import ISTError
from istfx.runtime.launch import check_port, free_port

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "models" / "mlp_digits.py"
LISTEN = "0A"
LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def _istfx() -> list[str]:
    script = Path(sys.executable).parent / "istfx"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "istfx.cli"]


def _listeners() -> dict[int, tuple[str, int]]:
    """inode -> (hex local address, port) of every listening TCP socket of this network namespace."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            next(handle)
            for line in handle:
                fields = line.split()
                if fields[3] == LISTEN:
                    address, port = fields[1].split(":")
                    out[int(fields[9])] = (address, int(port, 16))
    return out


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with_target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if with_target.startswith("socket:["):
                inodes.add(int(with_target[8:-1]))
    except OSError:
        pass
    return inodes


def test_local_train_listens_on_loopback_only(tmp_path):
    port = free_port()
    proc = subprocess.Popen([*_istfx(), "train", str(MODEL), "--subnets", "2", "--rounds", "20", "--threads", "1",
                             "--master-port", str(port), "-q"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen: dict[tuple[str, int], int] = {}  # (address, port) of the ranks' listening sockets -> times seen
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            listeners = _listeners()
            for pid in descendant_pids(proc.pid):
                for inode in _socket_inodes(pid) & set(listeners):
                    seen[listeners[inode]] = seen.get(listeners[inode], 0) + 1
            time.sleep(0.1)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert any(p == port for _, p in seen), f"never saw the store listening on {port}: {seen}"
    assert len(seen) > 1, f"never saw gloo's listening sockets: {seen}"  # the store and gloo's own
    exposed = {f"{a}:{p}" for a, p in seen if a not in LOOPBACK}
    assert not exposed, f"listening beyond 127.0.0.1: {exposed}"


def test_a_taken_master_port_fails_within_seconds(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("0.0.0.0", 0))  # another program, on every interface
        holder.listen(1)
        port = holder.getsockname()[1]
        start = time.monotonic()
        proc = subprocess.run([*_istfx(), "train", str(MODEL), "--subnets", "2", "--rounds", "2", "--threads", "1",
                               "--master-port", str(port)], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        took = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"the rendezvous port 127.0.0.1:{port} is not free" in proc.stderr
    assert "--master-port" in proc.stderr and "Traceback" not in proc.stderr
    assert took < 60  # the launcher builds the model once first, then checks the port


def test_check_port_and_the_ranks_listener(monkeypatch):
    from istfx.backends.torch_base import _is_loopback, _listen

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        with pytest.raises(ISTError, match=f"127.0.0.1:{port}"):
            check_port(port)
        with pytest.raises(ISTError, match=f"cannot listen on 127.0.0.1:{port}"):
            _listen("127.0.0.1", port)
    fd = _listen("127.0.0.1", 0)
    with socket.socket(fileno=fd) as sock:
        assert sock.getsockname()[0] == "127.0.0.1"
    assert _is_loopback("127.0.0.1") and _is_loopback("localhost") and _is_loopback("::1")
    assert not _is_loopback("10.1.2.3")
