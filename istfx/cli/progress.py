"""What ``istfx train`` is doing before its first round, with the time each phase took.

Start-up takes seconds to minutes on a busy machine (importing torch in
every process, capturing the model, joining the process group); without a
word the user cannot tell it from a hang. Three pieces say it:

- :class:`Phases` prints ``loading model... 2.1s`` in the process that does
  the work (the launcher, or the one process of ``--backend local``);
- :class:`RankStatus`: each rank writes its phase (and a user error, if it
  stops on one) to a small file in ``$ISTFX_STATUS_DIR``;
- :class:`StartupMonitor`: the launcher reads those files while it waits
  and prints one line per milestone that every rank reached, names a rank
  the others wait for, and prints each rank error once.

Nothing here imports torch.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import TextIO

__all__ = ["PHASES", "Phases", "RankStatus", "StartupMonitor", "STATUS_DIR_ENV", "read_status"]

STATUS_DIR_ENV = "ISTFX_STATUS_DIR"

# A rank's phases in order, and what the launcher prints once every rank has finished each one.
PHASES = ("importing", "capturing", "loading data", "joining")
_FINISHED = {
    "importing": "{n} ranks up (python, torch) in {t}; capturing the model...",
    "capturing": "model captured in {t}; loading data...",
    "loading data": "data loaded in {t}; joining...",
    "joining": "{n} ranks joined in {t}; training",
}
_DOING = {"importing": "importing torch", "capturing": "capturing the model", "loading data": "loading data",
          "joining": "joining"}
_WAIT_AFTER = 5.0  # seconds after the first rank finished a phase before the launcher names a late one
_REPEAT = 30.0  # seconds between "still waiting" lines for the same rank and phase


def _seconds(t: float) -> str:
    return f"{t:.1f}s"


class Phases:
    """Prints ``what... 1.2s`` for each phase of work in this process (nothing when disabled)."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream

    def say(self, text: str) -> None:
        """Print one line."""
        if self.enabled:
            print(text, file=self.stream or sys.stderr, flush=True)

    @contextlib.contextmanager
    def phase(self, what: str) -> Iterator[None]:
        """``with phases.phase("capturing model"):`` prints ``capturing model...`` then the seconds it took."""
        stream = self.stream or sys.stderr
        if self.enabled:
            print(f"{what}...", end="", file=stream, flush=True)
        start = time.monotonic()
        try:
            yield
        except BaseException:
            if self.enabled:
                print(" failed", file=stream, flush=True)
            raise
        if self.enabled:
            print(f" {_seconds(time.monotonic() - start)}", file=stream, flush=True)


class RankStatus:
    """One rank's phase, in ``DIR/rank-K`` for the launcher (:class:`StartupMonitor`) to read."""

    def __init__(self, directory: str, rank: int) -> None:
        self.path = os.path.join(directory, f"rank-{rank}")

    @classmethod
    def from_env(cls) -> RankStatus | None:
        """The status file of this rank when a launcher asked for one (``$ISTFX_STATUS_DIR``), else None."""
        directory = os.environ.get(STATUS_DIR_ENV)
        if not directory or "RANK" not in os.environ:
            return None
        return cls(directory, int(os.environ["RANK"]))

    def set(self, phase: str) -> None:
        """Record that this rank entered `phase` (one of :data:`PHASES`)."""
        self._write(phase)

    def error(self, message: str) -> None:
        """Record that this rank stopped on a user error; the launcher prints it (once for all ranks)."""
        self._write(f"error\t{message}")

    def _write(self, text: str) -> None:
        temporary = f"{self.path}.tmp"
        with contextlib.suppress(OSError):
            with open(temporary, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(temporary, self.path)  # the reader sees the old or the new text, never half


def read_status(directory: str, rank: int) -> str | None:
    """What rank `rank` last wrote (``"capturing"``, ``"error\\tmessage"``), or None."""
    try:
        with open(os.path.join(directory, f"rank-{rank}"), encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


class StartupMonitor:
    """Follows the ranks of a job from their start to the first round and says what they do.

    :meth:`poll` is called by :func:`istfx.runtime.launch.launch` while it
    waits (with each rank's exit code or None); :meth:`failure` words a rank
    that stopped; :meth:`report_errors` prints the user errors ranks wrote,
    each once.
    """

    def __init__(self, directory: str, nproc: int, ready_file: str | None, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.directory = directory
        self.nproc = nproc
        self.ready_file = ready_file
        self.enabled = enabled
        self.stream = stream
        self.start = self.mark = time.monotonic()
        self.done = 0  # milestones printed: index into PHASES
        self.first_done: float | None = None  # when the first rank finished the current phase
        self.told: dict[int, float] = {}  # rank -> when we last said we wait for it
        self.finished = False
        self.trained = False  # every rank joined: training ran

    def _say(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream or sys.stderr, flush=True)

    def begin(self) -> None:
        """Print that the ranks are starting."""
        self.start = self.mark = time.monotonic()
        self._say(f"starting {self.nproc} ranks...")

    def phase_of(self, rank: int) -> str:
        """Rank `rank`'s phase: ``"starting"`` before it wrote anything, ``"error"``, or one of :data:`PHASES`."""
        status = read_status(self.directory, rank)
        if status is None:
            return "starting"
        return status.split("\t", 1)[0]

    def _index(self, phase: str) -> int:
        """How many phases a rank in `phase` has finished."""
        if phase == "starting":
            return 0
        return PHASES.index(phase) if phase in PHASES else 0

    def poll(self, codes: list[int | None]) -> None:
        """Print the milestones every rank reached since the last call, and name late ranks."""
        if self.finished:
            return
        now = time.monotonic()
        if self.ready_file and os.path.exists(self.ready_file):
            self.trained = True
            while self.done < len(PHASES):  # every rank joined: the remaining milestones are reached
                self._milestone(now)
            self.finished = True
            return
        phases = [self.phase_of(r) for r in range(self.nproc)]
        if "error" in phases:
            self.finished = True
            return
        finished = [self._index(p) for p in phases]  # phases each rank has finished (joining ends at ready)
        while self.done < len(PHASES) - 1 and min(finished) > self.done:
            self._milestone(now)
        late = [r for r in range(self.nproc) if finished[r] <= self.done and codes[r] is None]
        doing = _DOING[PHASES[self.done]]
        if not any(f > self.done for f in finished):  # all ranks in the same phase: one line now and then
            if now - self.told.get(-1, self.mark) >= _REPEAT:
                self.told[-1] = now
                self._say(f"  still {doing} ({_seconds(now - self.mark)})...")
            return
        if self.first_done is None:
            self.first_done = now
        if now - self.first_done < _WAIT_AFTER:
            return
        for rank in late:  # the others finished this phase a while ago: name the ones they wait for
            if rank not in self.told or now - self.told[rank] >= _REPEAT:
                self.told[rank] = now
                self._say(f"  waiting for rank {rank} ({doing}, {_seconds(now - self.mark)})...")

    def _milestone(self, now: float) -> None:
        phase = PHASES[self.done]
        self._say(_FINISHED[phase].format(n=self.nproc, t=_seconds(now - self.mark)))
        self.done += 1
        self.mark = now
        self.first_done = None
        self.told.clear()

    def failure(self, rank: int, code: int) -> str:
        """One line on a rank that stopped with exit status `code`: which rank, in which phase.

        Empty for a rank that wrote its error (:meth:`report_errors` prints it).
        """
        phase = self.phase_of(rank)
        if phase == "error":
            return ""
        if self.finished:
            from istfx.runtime.launch import describe_exit

            return f"rank {rank} {describe_exit(code)}"
        doing = "starting python" if phase == "starting" else _DOING.get(phase, phase)
        return f"rank {rank} failed while {doing} (exit status {code}); its output is above"

    def report_errors(self) -> bool:
        """Print each user error the ranks wrote once, with the ranks that hit it; True if there was one."""
        by_message: dict[str, list[int]] = {}
        for rank in range(self.nproc):
            status = read_status(self.directory, rank)
            if status and status.startswith("error\t"):
                by_message.setdefault(status.split("\t", 1)[1], []).append(rank)
        for message, ranks in by_message.items():  # ranks are named only when they disagree
            where = "" if len(by_message) == 1 else \
                f" (rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})"
            print(f"istfx: error{where}: {message}", file=sys.stderr, flush=True)
        return bool(by_message)
