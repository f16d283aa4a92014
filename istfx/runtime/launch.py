"""Start the ranks of a distributed job on this machine, the way torchrun would.

:func:`launch` runs ``python -m MODULE ARGS`` once per rank with torchrun's
environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT``), so the same worker code runs
here and under ``torchrun`` on a cluster. Unlike torchrun's elastic agent,
which stops every rank when one fails, it can let a job go on without a
failed rank (``tolerate``): the parameter-server topology survives workers
that die, and the launcher must not end it for them. ::

    from istfx.runtime.launch import launch
    code = launch(["model.py", "--subnets", "4"], nproc=4, module="istfx.cli.train")

The job's exit status is rank 0's; a rank that fails and is not tolerated
stops the others. Ranks still running a few seconds after rank 0 finished
(hung workers the job already left behind) are terminated.

A ``monitor`` follows the ranks while the launcher waits: ``monitor.poll``
sees every rank's exit code (None while it runs) a few times a second, and
``monitor.failure(rank, code)`` words a rank that stopped (which phase it
was in). With ``status_dir`` the ranks see ``ISTFX_STATUS_DIR`` (where they
may write their phase, see :mod:`istfx.cli.progress`) and the ready file
lives there.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Protocol

__all__ = ["LaunchMonitor", "free_port", "launch", "rank_env"]


class LaunchMonitor(Protocol):
    """What :func:`launch` tells while it waits for the ranks."""

    def poll(self, codes: list[int | None]) -> None:
        """Called a few times a second with each rank's exit code (None while it runs)."""

    def failure(self, rank: int, code: int) -> str:
        """One line on rank `rank`, which exited with status `code` (e.g. the phase it was in);
        empty when the rank reported its error itself."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def rank_env(rank: int, world: int, master_port: int, master_addr: str = "127.0.0.1",
             threads: int | None = None, run_id: str | None = None) -> dict[str, str]:
    """torchrun's environment for `rank` of a single-node job."""
    env = {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "GROUP_RANK": "0",
        "ROLE_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "ROLE_WORLD_SIZE": str(world),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "ISTFX_RUN_ID": run_id or uuid.uuid4().hex[:12],
    }
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _stop(processes: Sequence[subprocess.Popen], grace: float) -> None:
    for proc in processes:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace
    for proc in processes:
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def launch(
    argv: Sequence[str],
    nproc: int,
    *,
    module: str = "istfx.cli.train",
    master_port: int | None = None,
    threads: int | None = None,
    env: dict[str, str] | None = None,
    tolerate: Callable[[int], bool] = lambda rank: False,
    grace: float = 10.0,
    python: str | None = None,
    status_dir: str | None = None,
    monitor: LaunchMonitor | None = None,
) -> int:
    """Run `nproc` ranks of ``python -m module *argv`` on this machine; return the job's exit status.

    Args:
        argv: arguments of every rank.
        nproc: number of ranks (the world size).
        master_port: the rendezvous port on 127.0.0.1 (default: a free one).
        threads: ``OMP_NUM_THREADS`` of each rank.
        env: extra environment variables for every rank.
        tolerate: ``tolerate(rank)`` is True when the job goes on after that
            rank fails once training started (rank 0's failure, and any
            failure before every rank joined, ends the job). The ranks see
            ``ISTFX_READY_FILE``, which rank 0 creates once all joined.
        grace: seconds ranks get to finish after rank 0 did, and to stop
            after a terminate.
        python: the interpreter of the ranks (default: this one).
        status_dir: an existing folder the ranks see as ``ISTFX_STATUS_DIR``;
            the ready file is ``status_dir/ready`` then.
        monitor: follows the ranks while the launcher waits (see :class:`LaunchMonitor`).
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    port = master_port or free_port()
    run_id = uuid.uuid4().hex[:12]
    # Rank 0 creates this file once every rank has joined; before that no failure is tolerated
    # (the others would wait for the missing rank at the rendezvous).
    ready = os.path.join(status_dir, "ready") if status_dir else \
        os.path.join(tempfile.gettempdir(), f"istfx-ready-{run_id}")
    command = [python or sys.executable, "-m", module, *argv]
    processes: list[subprocess.Popen] = []
    previous = {}

    def forward(signum, frame):  # pragma: no cover - interactive
        for proc in processes:
            if proc.poll() is None:
                proc.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[signum] = signal.signal(signum, forward)
        except ValueError:  # not the main thread
            pass
    try:
        for rank in range(nproc):
            child_env = dict(os.environ)
            # Ranks left behind (hung, then terminated) would log torch's C++ store errors at exit.
            child_env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
            child_env.update(env or {})
            child_env.update(rank_env(rank, nproc, port, threads=threads, run_id=run_id))
            child_env["ISTFX_READY_FILE"] = ready
            if status_dir is not None:
                child_env["ISTFX_STATUS_DIR"] = status_dir
            processes.append(subprocess.Popen(command, env=child_env))
        status = None
        while status is None:
            time.sleep(0.05)
            if monitor is not None:
                monitor.poll([proc.poll() for proc in processes])
            code = processes[0].poll()
            if code is not None:
                status = code
                if code != 0 and monitor is not None and monitor.failure(0, code):
                    print(f"istfx: {monitor.failure(0, code)}", file=sys.stderr)
                break
            for rank, proc in enumerate(processes[1:], start=1):
                code = proc.poll()
                if code is not None and code != 0 and not (tolerate(rank) and os.path.exists(ready)):
                    what = monitor.failure(rank, code) if monitor is not None else \
                        f"rank {rank} exited with status {code}"
                    if what:
                        print(f"istfx: {what}; stopping the job", file=sys.stderr)
                    deadline = time.monotonic() + grace  # the others notice and report it themselves
                    while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
                        time.sleep(0.05)
                    _stop(processes, grace)
                    return code if code > 0 else 1
        deadline = time.monotonic() + (grace if status == 0 else 0.0)
        for rank, proc in enumerate(processes[1:], start=1):
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        if any(proc.poll() is None for proc in processes):
            _stop(processes, grace)
        if status == 0:
            for rank, proc in enumerate(processes[1:], start=1):
                if proc.returncode not in (0, None) and not tolerate(rank) and proc.returncode > 0:
                    return proc.returncode
        return status if status >= 0 else 1
    finally:
        _stop(processes, 2.0)
        with contextlib.suppress(OSError):
            os.unlink(ready)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
