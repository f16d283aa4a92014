"""The fault matrix: kill -9 and SIGSTOP of rank 0, a worker and the launcher of a running `istfx train`.

Each job runs 2-3 gloo ranks on 127.0.0.1 with its own ``TMPDIR``; faults are
sent from outside, as an operator (or the kernel) would, once the job has
printed its first training rounds. What every cell asserts:

- the exit status, and how long after the fault the last process was gone;
- no orphans: none of the job's processes (launcher and ranks, by pid) is
  left running;
- the launcher's temporary files (``istfx-train-*``, ``istfx-ready-*``) are gone;
- the message: what happened, and one line saying how to resume (``--resume``
  with the checkpoint when there is one) when the job did not survive;
- where the job survives (ps workers; the stopped launcher): every round ran,
  the dead rank's slot was dealt to a live rank, and the final model is finite.

Jobs are shared between cells where a fault leaves the job running
(:func:`test_ps_survives_its_workers_and_a_stopped_launcher` strikes four
times in one job). Every subprocess is bounded in time and killed in a finally.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import child_pids
from istfx.errors import ISTError
from istfx.runtime import checkpoint
from istfx.runtime.launch import free_port as _free_port

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "models" / "mlp_digits.py"
START_TIMEOUT = 300  # seconds until a job trains: generous, CI shares 2 cores with other jobs
EXIT_WITHIN = 15.0  # seconds from the fault until every process of the job is gone
HEARTBEAT = 6.0  # --heartbeat-timeout of these jobs (a loaded CI machine may starve a rank for seconds)


def _state(pid: int) -> str | None:
    """The process state letter of `pid` (``R``, ``S``, ``T``, ``Z``...), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")


def _env_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


class Job:
    """One `istfx train` run in its own temporary folder, driven from outside."""

    def __init__(self, tmp_path: Path, *argv: str, subnets: int = 3, checkpoints: bool = True,
                 model: Path = MODEL) -> None:
        self.dir = tmp_path
        self.tmp = tmp_path / "tmp"  # the job's TMPDIR: its temporary files, and nothing else's
        self.tmp.mkdir()
        self.metrics = tmp_path / "metrics.jsonl"
        self.ckpt = tmp_path / "ckpt"
        self.final = tmp_path / "final.safetensors"
        extra = ["--checkpoint-dir", str(self.ckpt), "--checkpoint-every", "2"] if checkpoints else []
        self.command = [sys.executable, "-m", "istfx.cli.train", str(model), "--subnets", str(subnets),
                        "--threads", "1", "--local-steps", "2", "--batch-size", "16", "--eval-every", "50",
                        "--heartbeat-timeout", str(HEARTBEAT), "--metrics", str(self.metrics),
                        "--save", str(self.final), *extra, *argv]
        self.out = open(tmp_path / "stdout.txt", "w+", encoding="utf-8")
        self.err = open(tmp_path / "stderr.txt", "w+", encoding="utf-8")
        env = {**os.environ, "TMPDIR": str(self.tmp), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.command, stdout=self.out, stderr=self.err, env=env, cwd=tmp_path,
                                     start_new_session=True)
        self.ranks: dict[int, int] = {}  # rank -> pid
        self.struck = 0.0

    # -- watching ---------------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        lines = self.metrics.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip().endswith("}")]

    def wait_rounds(self, count: int, timeout: float = START_TIMEOUT) -> None:
        """Wait until `count` rounds are in the metrics (and record the ranks' pids)."""
        deadline = time.monotonic() + timeout
        while len(self.rows()) < count:
            assert self.proc.poll() is None, f"the job ended early ({self.proc.returncode}):\n{self.stderr()[-3000:]}"
            assert time.monotonic() < deadline, f"no round {count} within {timeout}s:\n{self.stderr()[-3000:]}"
            time.sleep(0.1)
        if not self.ranks:
            for pid in child_pids(self.proc.pid):
                rank = _env_of(pid).get("RANK")
                if rank is not None:
                    self.ranks[int(rank)] = pid

    def pids(self) -> list[int]:
        return [self.proc.pid, *self.ranks.values()]

    def strike(self, target: str | int, signum: int) -> None:
        """Send `signum` to ``"launcher"`` or to rank `target`."""
        pid = self.proc.pid if target == "launcher" else self.ranks[int(target)]
        self.struck = time.monotonic()
        os.kill(pid, signum)

    def wait_exit(self, timeout: float = EXIT_WITHIN) -> float:
        """Seconds from the last strike until no process of the job runs (asserted within `timeout`)."""
        deadline = self.struck + timeout
        while any(_alive(pid) for pid in self.pids()) and time.monotonic() < deadline:
            time.sleep(0.05)
        took = time.monotonic() - self.struck
        left = [(pid, _state(pid)) for pid in self.pids() if _alive(pid)]
        assert not left, f"still running {took:.1f}s after the fault: {left}\n{self.stderr()[-3000:]}"
        if self.proc.poll() is None:  # the launcher may be a zombie for a moment (it was just reaped)
            self.proc.wait(timeout=5)
        return took

    def stderr(self) -> str:
        self.err.flush()
        return (self.dir / "stderr.txt").read_text(encoding="utf-8")

    def stdout(self) -> str:
        self.out.flush()
        return (self.dir / "stdout.txt").read_text(encoding="utf-8")

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.tmp.iterdir() if p.name.startswith(("istfx-train-", "istfx-ready-")))

    def close(self) -> None:
        for pid in self.pids():
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.out.close()
        self.err.close()


@pytest.fixture
def job(tmp_path):
    jobs: list[Job] = []

    def start(*argv: str, **kwargs) -> Job:
        jobs.append(Job(tmp_path, *argv, **kwargs))
        return jobs[-1]

    yield start
    for j in jobs:
        j.close()


def _resume_line(err: str, job: Job) -> str:
    lines = [line for line in err.splitlines() if "--resume" in line and "istfx train" in line]
    assert len(lines) == 1, f"expected one line saying how to resume:\n{err[-3000:]}"
    newest = checkpoint.find(job.ckpt)
    assert newest is not None, "the job wrote no checkpoint before the fault"
    assert str(newest.path) in lines[0] and f"--checkpoint-dir {job.ckpt}" in lines[0]
    return lines[0]


def _finite(path: Path) -> bool:
    tensors, _ = checkpoint.load_file(path)
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


PACED = '''

# -- pacing: every rank sleeps a moment after each subnet's training, so that faults land mid-run
import time as _time

from istfx.backends.torch_base import TorchDistBackend as _Base


def _pace(backend, round, subnet):
    _time.sleep({seconds})


_Base.after_local_training = _pace
'''


def _paced_model(directory: Path, seconds: float) -> Path:
    path = directory / "paced.py"
    path.write_text(MODEL.read_text(encoding="utf-8") + PACED.format(seconds=seconds), encoding="utf-8")
    return path


def _backend_args(topology: str) -> list[str]:
    if topology == "deepspeed":
        return ["--backend", "deepspeed", "--zero-stage", "0"]
    return ["--topology", topology]


# -- ps: the job survives its workers ------------------------------------------------------------
def test_ps_survives_its_workers_and_a_stopped_launcher(job, tmp_path):
    """kill -9 of a worker, SIGSTOP of a worker, SIGSTOP/SIGCONT of the launcher, in one job."""
    rounds = 60
    j = job("--rounds", str(rounds), "--topology", "ps", model=_paced_model(tmp_path, 0.15))
    j.wait_rounds(3)
    # kill -9 worker 2: the launcher sees the exit and tells rank 0, which finishes the round without it
    j.strike(2, signal.SIGKILL)
    killed_at = len(j.rows())
    j.wait_rounds(killed_at + 3, timeout=60)
    rows = j.rows()
    hit = next(r for r in rows if r.get("failed"))
    assert list(hit["failed"]) == ["2"] and "SIGKILL" in hit["failed"]["2"] and "launcher" in hit["failed"]["2"]
    assert hit["seconds"] < HEARTBEAT  # known within the round, not after a heartbeat timeout
    assert rows[-1]["dealt"] == {"2": 1} and rows[-1]["excluded"] == [2] and rows[-1]["missing"] == []
    # SIGSTOP worker 1 (it trains slots 1 and 2 now): it is hung, found within the heartbeat timeout
    j.strike(1, signal.SIGSTOP)
    stopped_at = len(j.rows())
    j.wait_rounds(stopped_at + 3, timeout=60)
    rows = j.rows()
    hit = next(r for r in rows[stopped_at - 1:] if r.get("failed"))
    assert list(hit["failed"]) == ["1"] and hit["lost"] == {"1": 1, "2": 1}
    assert hit["seconds"] < HEARTBEAT + 4.0
    assert rows[-1]["dealt"] == {"1": 0, "2": 0} and rows[-1]["missing"] == []
    deadline = j.struck + HEARTBEAT + 5.0
    while _alive(j.ranks[1]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(j.ranks[1])  # the launcher killed the hung rank
    # SIGSTOP the launcher: the ranks go on training; SIGCONT: it finishes the job
    j.strike("launcher", signal.SIGSTOP)
    before = len(j.rows())
    time.sleep(3.0)
    during = len(j.rows())
    os.kill(j.proc.pid, signal.SIGCONT)
    assert during > before
    code = j.proc.wait(timeout=START_TIMEOUT)
    err = j.stderr()
    assert code == 0, err[-3000:]
    rows = j.rows()
    assert [r["round"] for r in rows] == list(range(rounds))
    assert all(not r["missing"] for r in rows[stopped_at + 1:])  # every unit trained once re-dealt
    assert _finite(j.final) and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert "rank 1 is hung (no heartbeat for" in err and "stopped by a signal" in err
    assert "slot 2 now trained by rank 1" in j.stdout() and "Traceback" not in err
    assert not any(_alive(pid) for pid in j.pids()) and j.leftovers() == []


# -- faults that end the job: every process exits within seconds, with a summary and how to resume -----
TERMINAL = [
    ("ps", "launcher", signal.SIGKILL),
    ("ps", 0, signal.SIGKILL),
    ("ps", 0, signal.SIGSTOP),
    ("sharded", 1, signal.SIGKILL),  # a unit lives on one rank only: the job stops, resumable
    ("sharded", 1, signal.SIGSTOP),
    ("deepspeed", 1, signal.SIGKILL),
    ("deepspeed", "launcher", signal.SIGKILL),
]


@pytest.mark.parametrize("topology,target,signum", TERMINAL,
                         ids=[f"{t}-{'rank' if isinstance(w, int) else ''}{w}-{signal.Signals(s).name}"
                              for t, w, s in TERMINAL])
def test_a_fault_that_ends_the_job_ends_it_cleanly(job, tmp_path, topology, target, signum):
    j = job("--rounds", "400", *_backend_args(topology), subnets=2, model=_paced_model(tmp_path, 0.1))
    j.wait_rounds(3)  # a checkpoint of round 2 exists
    j.strike(target, signum)
    hung = signum == signal.SIGSTOP
    took = j.wait_exit(EXIT_WITHIN + (HEARTBEAT if hung else 0.0))
    err = j.stderr()
    print(f"{topology} {target} {signal.Signals(signum).name}: every process gone {took:.1f}s after the fault")
    assert j.leftovers() == [], "temporary files left behind"
    _resume_line(err, j)
    assert "Traceback" not in err, err[-3000:]
    if target == "launcher":
        assert j.proc.returncode == -signum
        assert "the launcher died; rank 0 stops the job" in err
    else:
        assert j.proc.returncode not in (0, None)
        what = f"rank {target} was hung (no heartbeat for" if hung else f"rank {target} was killed by SIGKILL"
        assert what in err, err[-3000:]


# -- DeepSpeed's JIT-built comm op: never a silent wait on an interrupted build -------------------------
def _stale_lock(root: Path, age: float = 600.0) -> Path:
    directory = root / "deepspeed_shm_comm"
    directory.mkdir(parents=True)
    (directory / "build.ninja").write_text("# an interrupted build\n", encoding="utf-8")
    lock = directory / "lock"
    lock.touch()
    old = time.time() - age
    for path in (lock, directory / "build.ninja", directory):
        os.utime(path, (old, old))
    return directory


def test_a_stale_deepspeed_build_lock_is_reported_with_the_command_that_clears_it(tmp_path):
    directory = _stale_lock(tmp_path / "ext")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "TMPDIR": str(tmp_path)}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "istfx.cli.train", str(MODEL), "--backend", "deepspeed",
                           "--subnets", "2", "--rounds", "2", "--threads", "1"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=START_TIMEOUT)
    took = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = next(line for line in proc.stderr.splitlines() if "stale build lock" in line)
    assert f"{directory / 'lock'}" in line and f"`rm -rf {directory}`" in line and "Traceback" not in proc.stderr
    assert "starting 2 ranks" not in proc.stderr  # the launcher checks before it starts any rank
    assert took < START_TIMEOUT / 2, took  # (its imports take seconds to a minute on a loaded CI machine)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("istfx-")]


def test_a_deepspeed_build_in_progress_is_waited_for_with_a_message(tmp_path, monkeypatch):
    from istfx.backends.deepspeed_engine import check_shm_op_build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    directory = _stale_lock(tmp_path / "ext", age=0.0)
    builder = subprocess.Popen(["sleep", "30"], cwd=directory)  # a build working in the folder
    said: list[str] = []
    try:
        def finish():
            time.sleep(2.0)
            (directory / "lock").unlink()
        threading.Thread(target=finish, daemon=True).start()
        start = time.monotonic()
        check_shm_op_build(wait=60, say=said.append)
        took = time.monotonic() - start
    finally:
        builder.kill()
        builder.wait()
    assert 1.5 < took < 30 and said and f"being built in {directory} by process {builder.pid}" in said[0]
    # a lock with no build behind it is stale at once
    (directory / "lock").touch()
    os.utime(directory / "lock", (time.time() - 600, time.time() - 600))
    os.utime(directory, (time.time() - 600, time.time() - 600))
    start = time.monotonic()
    with pytest.raises(ISTError, match=f"stale build lock: {directory / 'lock'}"):
        check_shm_op_build(wait=60, say=said.append)
    assert time.monotonic() - start < 5.0


def test_sharded_under_torchrun_stops_within_the_heartbeat_timeout_of_a_hung_rank(tmp_path):
    """Without our launcher the sharded ranks watch each other's heartbeat in the store."""
    metrics = tmp_path / "m.jsonl"
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "--master-port",
               str(_free_port()), "-m", "istfx.cli.train", str(_paced_model(tmp_path, 0.1)), "--subnets", "2",
               "--topology", "sharded", "--rounds", "400", "--local-steps", "2", "--threads", "1", "--eval-every",
               "50", "--heartbeat-timeout", str(HEARTBEAT), "--metrics", str(metrics)]
    err = tmp_path / "stderr.txt"
    with open(err, "w", encoding="utf-8") as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, cwd=tmp_path,
                                start_new_session=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    ranks: dict[int, int] = {}
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (metrics.exists() and metrics.read_text(encoding="utf-8").count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text(encoding="utf-8")[-3000:]
            time.sleep(0.1)
        ranks = {int(_env_of(p)["RANK"]): p for p in child_pids(proc.pid) if "RANK" in _env_of(p)}
        struck = time.monotonic()
        os.kill(ranks[1], signal.SIGSTOP)
        while _alive(ranks[0]) and time.monotonic() < struck + HEARTBEAT + EXIT_WITHIN:
            time.sleep(0.05)
        took = time.monotonic() - struck
        print(f"sharded under torchrun, rank 1 SIGSTOP: rank 0 stopped the job {took:.1f}s after the fault")
        assert not _alive(ranks[0]), err.read_text(encoding="utf-8")[-3000:]
        assert "rank 1 is hung (no heartbeat for" in err.read_text(encoding="utf-8") and "--resume" in err.read_text(
            encoding="utf-8")
        os.kill(ranks[1], signal.SIGCONT)  # torchrun's SIGTERM is pending on it
        assert proc.wait(timeout=60) != 0
        assert not any(_alive(p) for p in ranks.values())
    finally:
        for pid in [proc.pid, *ranks.values()]:
            if _alive(pid):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
