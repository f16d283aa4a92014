"""The DeepSpeed backend on DeepSpeed's CPU accelerator (gloo), started by ``istfx train`` and by ``deepspeed``.

Each subnet trains under a DeepSpeed engine on D ranks. A step of D ranks
x G accumulated micro-batches of size B averages the gradients of the same
D*G batches one process sees as a batch of D*G*B (no BatchNorm in the test
model, mean loss), so with plain SGD both runs must end at the local
backend's result for batch size D*G*B:

- 2 subnets x 2 data-parallel ranks, ZeRO stage 2, fp32, ``istfx train``:
  equal to float rounding;
- 2 subnets x 1 rank, ZeRO stage 1, 2 accumulation steps, bf16, under the
  ``deepspeed`` launcher: equal within bf16's precision, and not equal bit
  for bit (the engine really computed in bf16).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from istfx.runtime import checkpoint
from istfx.cli.train import main as train_main
from istfx.errors import ISTError

# DeepSpeed is an optional extra that pip cannot install with the others (it must be built against the
# installed torch, without build isolation); scripts/setup.sh installs it, so CI always runs these tests.
deepspeed = pytest.importorskip(
    "deepspeed", reason='the optional DeepSpeed backend: pip install --no-build-isolation "istfx[deepspeed]"')
import sklearn  # noqa: E402,F401  (the default data, scikit-learn's digits; in the test extra)

MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 48)
        self.fc2 = nn.Linear(48, 40)
        self.fc3 = nn.Linear(40, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def build_model():
    return Net()


example_inputs = (torch.randn(8, 64),)
'''

# 3 rounds x 3 steps x 2 batches of 32 stay inside one pass over a subnet's shard of digits, where
# two consecutive batches of 32 are exactly one batch of 64.
COMMON = ["--subnets", "2", "--rounds", "3", "--local-steps", "3", "--lr", "0.5", "--momentum", "0",
          "--threads", "1", "--eval-every", "3", "--seed", "3", "--quiet"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("deepspeed")
    (path / "net.py").write_text(MODEL, encoding="utf-8")
    return path


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def _load(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_file(path)[0]


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def reference(workdir) -> dict[str, torch.Tensor]:
    """The local backend with batches of 64: what both DeepSpeed runs must reproduce."""
    threads = torch.get_num_threads()
    try:
        assert train_main([str(workdir / "net.py"), "--backend", "local", *COMMON, "--batch-size", "64",
                           "--save", str(workdir / "local.safetensors")]) == 0
    finally:
        torch.set_num_threads(threads)
    return _load(workdir / "local.safetensors")


def test_data_parallel_zero2_engines_reproduce_the_local_backend(workdir, reference):
    out, metrics = workdir / "zero2.safetensors", workdir / "zero2.jsonl"
    _run([sys.executable, "-m", "istfx.cli.train", "net.py", "--backend", "deepspeed", "--data-parallel", "2",
          "--zero-stage", "2", *COMMON, "--batch-size", "32", "--save", str(out), "--metrics", str(metrics)],
         workdir)
    trained = _load(out)
    assert trained.keys() == reference.keys()
    for name, value in reference.items():
        assert trained[name].dtype == value.dtype
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6, msg=name)
    rows = _metrics(metrics)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert row["zero_stage"] == 2 and row["data_parallel"] == 2 and row["world_size"] == 4
        assert row["samples"] == 2 * 3 * 2 * 32  # subnets x steps x data-parallel ranks x batch
        # every group's leader receives its subnet and sends it back; its gradient all-reduce comes on top
        sizes = row["bytes_per_subnet"]
        assert all(recv >= size + row["gradient_bytes_per_rank"] for recv, size in zip(row["bytes_received"], sizes))
        assert row["gradient_bytes_per_rank"] > 0
    assert rows[-1]["eval_accuracy"] is not None


def test_bf16_accumulating_engines_under_the_deepspeed_launcher(workdir, reference):
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    assert launcher, "DeepSpeed installs the `deepspeed` launcher next to the interpreter"
    out = workdir / "bf16.safetensors"
    proc = _run([launcher, "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "istfx.cli.train",
                 "net.py", "--backend", "deepspeed", "--zero-stage", "1", "--grad-accum", "2", "--precision", "bf16",
                 *[a for a in COMMON if a != "--quiet"], "--batch-size", "32", "--save", str(out)], workdir)
    assert "ZeRO stage 1, 2 accumulation steps, bf16" in proc.stdout
    trained = _load(out)
    for name, value in reference.items():
        assert trained[name].dtype == torch.float32  # the model keeps its dtype; the engine held bf16 copies
        torch.testing.assert_close(trained[name], value, rtol=0.0, atol=2e-2, msg=name)
    assert any(not torch.allclose(trained[n], v, rtol=0.0, atol=1e-5) for n, v in reference.items()), \
        "bf16 training should not match fp32 to 1e-5"


def _free_port() -> int:
    from istfx.runtime.launch import free_port

    return free_port()


def test_bad_deepspeed_settings_are_refused_with_the_fix(workdir, capsys):
    from istfx.backends import DeepSpeedBackend

    with pytest.raises(ISTError, match="zero_stage must be 0, 1 or 2"):
        DeepSpeedBackend(zero_stage=3)
    with pytest.raises(ISTError, match="precision must be one of"):
        DeepSpeedBackend(precision="int8")
    with pytest.raises(ISTError, match="data_parallel must be an int >= 1"):
        DeepSpeedBackend(data_parallel=0)
    # checking the world's size creates no group: that is create_groups' job, on every rank in the same order
    backend = DeepSpeedBackend(data_parallel=2)
    backend.world_size = 4
    backend.check_world(2)
    assert not torch.distributed.is_initialized()
    with pytest.raises(ISTError, match="3 subnets x 2 data-parallel ranks = 6 ranks, but the world has 4"):
        backend.check_world(3)
    for argv, message in ((["--backend", "torch", "--data-parallel", "2"], "--data-parallel is an option of "
                                                                          "--backend deepspeed"),
                          (["--backend", "deepspeed", "--topology", "sharded", "--compress", "int8"],
                           "--topology, --compress are options of --backend torch")):
        with pytest.raises(SystemExit) as exit_:
            train_main([str(workdir / "net.py"), *argv, *COMMON])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
