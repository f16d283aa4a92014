"""Per-process memory caps for benchmarks, enforced by the kernel through cgroups (needs root).

A :class:`MemoryCaps` makes one memory cgroup per capped process, under the
benchmark's own cgroup (v2: ``memory.max``; v1: ``memory.limit_in_bytes``,
swap capped too where the kernel accounts it). A process joins its cgroup
before it executes anything (:meth:`Cap.wrap`), so everything it allocates
counts, and the kernel OOM-kills it when it goes over::

    with MemoryCaps() as caps:              # raises CapsUnavailable with the reason
        cap = caps.new(512 * 2 ** 20)
        proc = subprocess.Popen(cap.wrap([sys.executable, "worker.py"]))
        proc.wait()
        print(cap.oom_kills(), cap.peak_bytes())
    # every cgroup made here is gone, also after Ctrl-C or SIGTERM

Cleaning up: on exit from the ``with`` block, on SIGINT/SIGTERM and at
interpreter exit, processes still in a cap (started by this benchmark) are
killed by pid and the cgroups are removed. Directories are named
``istfx-bench-<pid>-<n>``; ones left by a benchmark that was killed with
SIGKILL are removed by the next run (:func:`remove_stale`) once their owner
process is gone (and nothing runs in them).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import time
from pathlib import Path

from istfx.runtime.launch import process_alive

PREFIX = "istfx-bench-"


class CapsUnavailable(RuntimeError):
    """Memory cgroups cannot be used here (not root, no memory controller, read-only...)."""


def _mounts() -> dict[str, Path]:
    """cgroup mount points: {"v2": path} and/or {"v1": path of the memory hierarchy}."""
    found: dict[str, Path] = {}
    with open("/proc/mounts", encoding="ascii") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) < 4:
                continue
            if parts[2] == "cgroup2":
                found.setdefault("v2", Path(parts[1]))
            elif parts[2] == "cgroup" and "memory" in parts[3].split(","):
                found.setdefault("v1", Path(parts[1]))
    return found


def _own_paths() -> dict[str, str]:
    """This process's cgroup paths: {"v2": "/a/b", "v1": "/c"} from /proc/self/cgroup."""
    paths: dict[str, str] = {}
    with open("/proc/self/cgroup", encoding="ascii") as handle:
        for line in handle:
            number, controllers, path = line.rstrip("\n").split(":", 2)
            if number == "0" and controllers == "":
                paths["v2"] = path
            elif "memory" in controllers.split(","):
                paths["v1"] = path
    return paths


def _write(path: Path, text: str) -> None:
    with open(path, "w", encoding="ascii") as handle:
        handle.write(text)


class Cap:
    """One memory cgroup with a limit; processes join it through :meth:`wrap`."""

    def __init__(self, path: Path, version: str, limit: int) -> None:
        self.path = path
        self.version = version
        self.limit = int(limit)

    def wrap(self, command: list[str]) -> list[str]:
        """`command` run by a shell that first moves itself into this cgroup, then ``exec`` s it."""
        procs = self.path / "cgroup.procs"
        return ["/bin/sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "istfx-capped", *command]

    def _read(self, name: str) -> str:
        try:
            return (self.path / name).read_text(encoding="ascii")
        except OSError:
            return ""

    def oom_kills(self) -> int:
        """Processes the kernel killed in this cgroup for going over the limit."""
        text = self._read("memory.events" if self.version == "v2" else "memory.oom_control")
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        # Older v1 kernels have no oom_kill counter: a hit limit is the best evidence left.
        return int(self._read("memory.failcnt") or 0) if self.version == "v1" and not text else 0

    def peak_bytes(self) -> int | None:
        """Peak memory charged to the cgroup (anonymous memory and page cache)."""
        text = self._read("memory.peak" if self.version == "v2" else "memory.max_usage_in_bytes").strip()
        return int(text) if text.isdigit() else None

    def pids(self) -> list[int]:
        """Processes in the cgroup now."""
        return [int(p) for p in self._read("cgroup.procs").split()]

    def remove(self, timeout: float = 10.0, kill: bool = True) -> None:
        """Kill what is left inside (processes this benchmark started) and delete the cgroup.

        With ``kill=False`` a cgroup that still holds processes is left alone (OSError).
        """
        deadline = time.monotonic() + timeout
        while self.path.exists():
            for pid in self.pids() if kill else []:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


class MemoryCaps:
    """Makes :class:`Cap` s under this process's memory cgroup; removes them all on exit (also on signals)."""

    def __init__(self) -> None:
        self.version, self.base = self._locate()
        self.caps: list[Cap] = []
        self._count = 0
        self._previous: dict[int, object] = {}
        remove_stale(self.base)
        probe = self.new(64 * 2 ** 20)  # a cgroup that cannot be made or limited is found now, not mid-run
        probe.remove()
        self.caps.remove(probe)

    @staticmethod
    def _locate() -> tuple[str, Path]:
        if os.geteuid() != 0:
            raise CapsUnavailable("memory caps need root (cgroups are written under /sys/fs/cgroup)")
        mounts, own = _mounts(), _own_paths()
        if "v2" in mounts and "v2" in own:
            root = mounts["v2"]
            if "memory" in (root / "cgroup.controllers").read_text(encoding="ascii").split():
                base = root / own["v2"].lstrip("/")
                if "memory" not in (base / "cgroup.subtree_control").read_text(encoding="ascii").split():
                    try:
                        _write(base / "cgroup.subtree_control", "+memory")
                    except OSError as exc:  # processes in base: v2 allows no controller in an inner node then
                        if "v1" not in mounts:
                            raise CapsUnavailable(f"cannot enable the v2 memory controller in {base}: {exc}") \
                                from None
                    else:
                        return "v2", base
                else:
                    return "v2", base
        if "v1" in mounts and "v1" in own:
            return "v1", mounts["v1"] / own["v1"].lstrip("/")
        raise CapsUnavailable("no usable memory cgroup controller (neither cgroup v2 memory.max nor v1 memory)")

    def new(self, limit_bytes: int) -> Cap:
        """A fresh cgroup capped at `limit_bytes` (swap capped too where accounted)."""
        self._count += 1
        path = self.base / f"{PREFIX}{os.getpid()}-{self._count}"
        try:
            path.mkdir()
        except OSError as exc:
            raise CapsUnavailable(f"cannot create cgroup {path}: {exc}") from None
        cap = Cap(path, self.version, limit_bytes)
        self.caps.append(cap)
        try:
            if self.version == "v2":
                _write(path / "memory.max", str(int(limit_bytes)))
                if (path / "memory.swap.max").exists():
                    _write(path / "memory.swap.max", "0")
            else:
                _write(path / "memory.limit_in_bytes", str(int(limit_bytes)))
                if (path / "memory.memsw.limit_in_bytes").exists():
                    with contextlib.suppress(OSError):  # present but not enforced without swap accounting
                        _write(path / "memory.memsw.limit_in_bytes", str(int(limit_bytes)))
        except OSError as exc:
            cap.remove()
            self.caps.remove(cap)
            raise CapsUnavailable(f"cannot set a memory limit in {path}: {exc}") from None
        return cap

    def discard(self, cap: Cap) -> None:
        """Remove `cap` now (killing processes left inside); nothing happens if it is already gone."""
        if cap in self.caps:
            self.caps.remove(cap)
        cap.remove()

    def close(self) -> None:
        """Remove every cgroup made here (killing processes left inside)."""
        while self.caps:
            cap = self.caps.pop()
            with contextlib.suppress(OSError):
                cap.remove()

    def __enter__(self) -> "MemoryCaps":
        atexit.register(self.close)
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: the with block still cleans up
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        self.close()
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc) -> None:
        self.close()
        for signum, handler in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, handler)
        atexit.unregister(self.close)


def remove_stale(base: Path) -> list[Path]:
    """Remove empty ``istfx-bench-<pid>-*`` cgroups under `base` whose benchmark process is gone."""
    removed = []
    for path in base.glob(f"{PREFIX}*"):
        try:
            owner = int(path.name[len(PREFIX):].split("-")[0])
        except ValueError:
            continue
        if owner != os.getpid() and not process_alive(owner):
            with contextlib.suppress(OSError):
                Cap(path, "", 0).remove(timeout=0.0, kill=False)
                removed.append(path)
    return removed


def available() -> str | None:
    """None when memory caps work here, else the reason they do not."""
    try:
        MemoryCaps().close()
    except (CapsUnavailable, OSError) as exc:
        return str(exc)
    return None
