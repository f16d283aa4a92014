"""Start the ranks of a distributed job on this machine, the way torchrun would.

:func:`launch` runs ``python -m MODULE ARGS`` once per rank with torchrun's
environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT``), so the same worker code runs
here and under ``torchrun`` on a cluster. Rank 0's rendezvous store and gloo
listen on 127.0.0.1 only (see ``init_distributed`` in
:mod:`istfx.backends.torch_base`); a ``master_port`` in use fails at once. Unlike torchrun's elastic agent,
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
lives there; the launcher also writes ``exited-RANK`` there (the exit
status) the moment it sees a rank stop, so rank 0 knows of a dead worker
within a fraction of a second (:func:`exited_ranks`).

Nothing outlives the job: each rank gets the parent-death signal (SIGTERM
when the launcher dies, however it dies: ``prctl(PR_SET_PDEATHSIG)``), and
:func:`guard_rank`, which the ranks install, turns SIGTERM/SIGINT or a
vanished launcher into a prompt ``os._exit`` even while the rank is blocked
in a collective, removing the launcher's temporary files when it is gone.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Protocol

__all__ = ["LAUNCHER_PID_ENV", "LaunchMonitor", "check_port", "describe_exit", "exited_ranks", "free_port",
           "guard_rank", "launch", "rank_env"]

LAUNCHER_PID_ENV = "ISTFX_LAUNCHER_PID"
HEARTBEAT_INTERVAL = 0.5  # seconds between a rank's heartbeats (the mtime of ``alive-RANK``)
_PR_SET_PDEATHSIG = 1
_EXITED = "exited-"


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


def check_port(port: int, host: str = "127.0.0.1") -> None:
    """Raise ISTError at once when nothing can listen on `host`:`port` (another process holds it)."""
    from istfx.errors import ISTError

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to listen on
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ISTError(f"the rendezvous port {host}:{port} is not free ({exc.strerror}): pass another "
                           "--master-port, or leave it out for a free one.") from None


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


def describe_exit(code: int) -> str:
    """``exited with status 3`` or ``was killed by SIGKILL`` for a Popen return code."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with status {code}"


def exited_ranks(status_dir: str | None) -> dict[int, int]:
    """Ranks the launcher saw exit, with their exit status (Popen's: negative for a signal); {} without a
    status folder (e.g. under torchrun)."""
    out: dict[int, int] = {}
    if not status_dir:
        return out
    with contextlib.suppress(OSError):
        for entry in os.listdir(status_dir):
            if entry.startswith(_EXITED) and entry[len(_EXITED):].isdigit():
                with contextlib.suppress(OSError, ValueError):
                    with open(os.path.join(status_dir, entry), encoding="utf-8") as f:
                        out[int(entry[len(_EXITED):])] = int(f.read().split("\t", 1)[0])
    return out


def exit_reason(status_dir: str | None, rank: int) -> str | None:
    """Why the launcher saw rank `rank` stop (``was killed by SIGKILL``, ``hung: no heartbeat for 6.1s``), or None."""
    if not status_dir:
        return None
    try:
        with open(os.path.join(status_dir, f"{_EXITED}{rank}"), encoding="utf-8") as f:
            return f.read().split("\t", 1)[1].strip()
    except (OSError, IndexError):
        return None


def _record_exit(status_dir: str | None, rank: int, code: int, reason: str) -> None:
    if status_dir:
        with contextlib.suppress(OSError):
            path = os.path.join(status_dir, f"{_EXITED}{rank}")
            with open(f"{path}.tmp", "w", encoding="utf-8") as f:
                f.write(f"{code}\t{reason}")
            os.replace(f"{path}.tmp", path)


def process_alive(pid: int) -> bool:
    """Whether a process `pid` exists (a zombie counts until reaped; another user's process counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _alive_file(status_dir: str | None, rank: str | None) -> str | None:
    return os.path.join(status_dir, f"alive-{rank}") if status_dir and rank is not None else None


def _idle_for(status_dir: str | None, rank: int, pid: int, busy: dict[int, tuple[int, float]]) -> float | None:
    """Seconds rank `rank` has neither beaten its heartbeat nor used CPU (None before its first beat).

    A C++ call that holds the GIL while it spins (DeepSpeed's shared-memory
    all-reduce waiting for a slow peer) stops the heartbeat thread but not the
    CPU clock; a stopped or deadlocked process stops both.
    """
    silent = _silent_for(status_dir, rank)
    if silent is None:
        return None
    now = time.monotonic()
    ticks = _cpu_ticks(pid)
    last, moved = busy.get(rank, (ticks, now))
    if ticks != last:
        moved = now
    busy[rank] = (ticks, moved)
    return min(silent, now - moved)


def _cpu_ticks(pid: int) -> int:
    """User plus system CPU time of process `pid` in clock ticks (-1 when unknown)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return -1


def _silent_for(status_dir: str | None, rank: int) -> float | None:
    """Seconds since rank `rank` last beat (None before its first beat)."""
    path = _alive_file(status_dir, str(rank))
    try:
        return time.time() - os.stat(path).st_mtime if path else None
    except OSError:
        return None


def _reported(monitor: LaunchMonitor | None, rank: int) -> bool:
    """Whether rank `rank` wrote its error for the launcher (a :class:`~istfx.cli.progress.StartupMonitor`)."""
    phase_of = getattr(monitor, "phase_of", None)
    return phase_of is not None and phase_of(rank) == "error"


def _failure(monitor: LaunchMonitor | None, rank: int, code: int, hung: dict[int, str]) -> str:
    if rank in hung:
        return f"rank {rank} was {hung[rank]}, killed"
    return monitor.failure(rank, code) if monitor is not None else f"rank {rank} {describe_exit(code)}"


def _stopped(pid: int) -> str:
    """`` (stopped by a signal)`` when process `pid` is in the stopped state, else empty."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return ", stopped by a signal" if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t") else ""
    except (OSError, IndexError):
        return ""


def _libc_prctl():
    with contextlib.suppress(OSError, AttributeError):
        if sys.platform.startswith("linux"):
            return ctypes.CDLL(None, use_errno=True).prctl
    return None


def die_with_this_process() -> Callable[[], None]:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets SIGTERM when this process dies, however it dies
    (``kill -9`` included; Linux's parent-death signal, nothing elsewhere). Spawn from the main thread: the
    signal follows the thread that started the child."""
    return _die_with_parent(_libc_prctl(), os.getpid())


def _die_with_parent(prctl, parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGTERM when the launcher dies (Linux; nothing elsewhere)."""
    def setup() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != parent:  # the launcher died before the prctl: nobody would signal us
                os.kill(os.getpid(), signal.SIGTERM)
    return setup


def guard_rank(on_stop: Callable[[str, bool], None] | None = None, poll: float = 0.2) -> bool:
    """In a rank our launcher started: exit within a moment of SIGTERM, SIGINT or the launcher's death.

    Python runs signal handlers only in the main thread between bytecodes,
    so a rank blocked in a gloo receive would not react for up to the
    process group timeout. Here the signals are written to a wakeup pipe
    that a watcher thread reads; it also checks every `poll` seconds that
    the launcher is still the parent. Then it calls ``on_stop(reason,
    orphaned)`` (say what happened), removes the launcher's temporary files
    when the launcher is gone, and ends the process with ``os._exit``.
    Returns False (nothing installed) outside our launcher or off the main thread.
    """
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if not launcher or not launcher.isdigit() or threading.current_thread() is not threading.main_thread():
        return False
    launcher_pid = int(launcher)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)  # the watcher thread acts; the main thread just goes on
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def stop(reason: str, orphaned: bool, code: int) -> None:
        with contextlib.suppress(Exception):
            if on_stop is not None:
                on_stop(reason, orphaned)
        if orphaned:  # nobody else will remove them
            status_dir = os.environ.get("ISTFX_STATUS_DIR")
            if status_dir and os.path.basename(status_dir).startswith("istfx-train-"):
                shutil.rmtree(status_dir, ignore_errors=True)
            ready = os.environ.get("ISTFX_READY_FILE")
            if ready:
                with contextlib.suppress(OSError):
                    os.unlink(ready)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)

    beat = _alive_file(os.environ.get("ISTFX_STATUS_DIR"), os.environ.get("RANK"))
    last_beat = 0.0

    def watch() -> None:
        nonlocal last_beat
        while True:
            if beat is not None and time.monotonic() - last_beat >= HEARTBEAT_INTERVAL:
                last_beat = time.monotonic()
                with contextlib.suppress(OSError):
                    with open(beat, "w", encoding="ascii"):
                        pass  # the launcher reads its modification time
            readable, _, _ = select.select([read_end], [], [], poll)
            orphaned = os.getppid() != launcher_pid
            # the wakeup pipe carries every signal that has a Python handler: act on ours only
            caught = [n for n in (os.read(read_end, 64) if readable else b"") if n in (signal.SIGTERM, signal.SIGINT)]
            if caught:
                name = signal.Signals(caught[-1]).name
                stop("the launcher died" if orphaned else f"stopped by {name}", orphaned, 128 + caught[-1])
            elif orphaned:
                stop("the launcher died", True, 1)

    threading.Thread(target=watch, name="istfx-rank-guard", daemon=True).start()
    return True


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
    heartbeat_timeout: float | None = None,
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
        heartbeat_timeout: with `status_dir`, once every rank joined, a rank
            that neither beats its heartbeat (written by :func:`guard_rank`)
            nor uses CPU for this long is hung (stopped by a signal,
            deadlocked): the launcher kills it, and the job treats it as dead.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if master_port is not None:
        check_port(master_port)  # rank 0 would fail to listen only after its imports, the others wait
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
    prctl = _libc_prctl()
    try:
        for rank in range(nproc):
            child_env = dict(os.environ)
            # Ranks left behind (hung, then terminated) would log torch's C++ store errors at exit.
            child_env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
            child_env.update(env or {})
            child_env.update(rank_env(rank, nproc, port, threads=threads, run_id=run_id))
            child_env["ISTFX_READY_FILE"] = ready
            child_env[LAUNCHER_PID_ENV] = str(os.getpid())
            if status_dir is not None:
                child_env["ISTFX_STATUS_DIR"] = status_dir
            processes.append(subprocess.Popen(command, env=child_env,
                                              preexec_fn=_die_with_parent(prctl, os.getpid())))
        recorded: set[int] = set()
        hung: dict[int, str] = {}
        busy: dict[int, tuple[int, float]] = {}  # rank -> (CPU ticks, when they last moved)
        status = None
        while status is None:
            time.sleep(0.05)
            codes = [proc.poll() for proc in processes]
            for rank, code in enumerate(codes):
                if code is not None and rank not in recorded:
                    recorded.add(rank)  # rank 0 reads it: a dead worker is known at once
                    _record_exit(status_dir, rank, code, hung.get(rank) or describe_exit(code))
                elif code is None and heartbeat_timeout and rank not in hung and os.path.exists(ready):
                    silent = _idle_for(status_dir, rank, processes[rank].pid, busy)
                    if silent is not None and silent > heartbeat_timeout:
                        hung[rank] = f"hung (no heartbeat for {silent:.1f}s{_stopped(processes[rank].pid)})"
                        print(f"istfx: rank {rank} is {hung[rank]}; killing it", file=sys.stderr, flush=True)
                        with contextlib.suppress(OSError):
                            processes[rank].kill()
            if monitor is not None:
                monitor.poll(codes)
            code = codes[0]
            if code is not None:
                status = code
                if code != 0:
                    what = _failure(monitor, 0, code, hung)
                    if what:
                        others = sum(c is None for c in codes[1:])
                        print(f"istfx: {what}" + (f"; stopping the other {others} rank{'s' * (others > 1)}"
                                                  if others else ""), file=sys.stderr, flush=True)
                break
            for rank, proc in enumerate(processes[1:], start=1):
                code = codes[rank]
                if code is not None and code != 0 and not (tolerate(rank) and os.path.exists(ready)):
                    what = _failure(monitor, rank, code, hung)
                    if what:
                        print(f"istfx: {what}; stopping the job", file=sys.stderr, flush=True)
                    # the others notice and report it themselves; once they did (or exited) they are stopped:
                    # a rank leaving a broken process group can block in its teardown
                    deadline = time.monotonic() + grace
                    while any(p.poll() is None and not _reported(monitor, r) for r, p in enumerate(processes)) \
                            and time.monotonic() < deadline:
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
