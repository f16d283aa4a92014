"""Optimizer state that travels with its units and the outer step, checked for exactness on every backend.

(a) One subnet, carried state, no outer step: every backend (local, torch ps,
    torch sharded, DeepSpeed ZeRO 0) trains the model exactly as a plain
    PyTorch loop with the same optimizer (AdamW with weight decay, warm-up and
    cosine schedule, gradient clipping), data order and seed: float64, within
    1e-12.
(b) The same ``istfx train`` command, carried state and the outer step on,
    under ``--backend local``, ``--backend torch --topology ps``,
    ``--topology sharded`` and DeepSpeed ZeRO 0 gives the same model within
    1e-5.
(c) ``--outer-lr 1 --outer-momentum 0`` is today's write-back bit for bit.

The distributed runs are processes on gloo over 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BN_MLP_MODEL_FILE
from torch import nn

import istfx
from istfx.runtime import checkpoint
from istfx.runtime.optimizers import TrainingRecipe
from istfx.cli.train import main as train_main

import deepspeed  # noqa: F401  (the DeepSpeed backend's engine; in the deepspeed extra)

ROUNDS, LOCAL_STEPS = 3, 4
RECIPE = dict(optimizer="adamw", lr=0.02, weight_decay=0.1, betas=(0.9, 0.95), warmup_steps=3, lr_schedule="cosine",
              clip_grad_norm=0.5, optimizer_state="carry")

MODEL = '''
import torch
from torch import nn


def build_model(dtype=torch.float64):
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).to(dtype)


def example_inputs_of(dtype=torch.float64):
    return (torch.randn(4, 6, dtype=dtype),)


example_inputs = example_inputs_of()


def batches(dtype=torch.float64):
    generator = torch.Generator().manual_seed(11)
    return [(torch.randn(8, 6, generator=generator, dtype=torch.float64).to(dtype),
             torch.randint(0, 3, (8,), generator=generator)) for _ in range(5)]
'''

# Runs fit with one subnet on the backend named in argv[2] (a process of its own: WORLD_SIZE=1) and saves the model.
RUNNER = '''
import sys, torch
sys.path.insert(0, sys.argv[1])
import istfx, one
from istfx.runtime import checkpoint
from istfx.runtime.optimizers import TrainingRecipe
import json
torch.set_num_threads(1)
backend_name, out = sys.argv[2], sys.argv[3]
recipe = TrainingRecipe(**json.loads(sys.argv[4]))
rounds, local_steps = int(sys.argv[5]), int(sys.argv[6])
dtype = getattr(torch, sys.argv[7])
model = one.build_model(dtype)
ist = istfx.compile(model, 1, example_inputs=one.example_inputs_of(dtype))
if backend_name == "deepspeed":
    from istfx.backends import DeepSpeedBackend
    backend = DeepSpeedBackend(zero_stage=0)
else:
    from istfx.backends import TorchDistBackend
    backend = TorchDistBackend(backend_name, backend="gloo")
istfx.fit(ist, one.batches(dtype), rounds=rounds, local_steps=local_steps, backend=backend, progress=False,
          **recipe.fit_kwargs(total_steps=rounds * local_steps))
checkpoint.atomic_save({n: t.detach().clone() for n, t in ist.model.state_dict().items()}, out)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _module(tmp_path: Path):
    (tmp_path / "one.py").write_text(MODEL, encoding="utf-8")
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        import one
        return importlib.reload(one)
    finally:
        sys.path.remove(str(tmp_path))


def _plain_loop(module, rounds: int, local_steps: int, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """The reference: one model, one AdamW, the same batches in the same order, schedule and clipping."""
    recipe = TrainingRecipe(**RECIPE)
    model = module.build_model(dtype)
    optimizer = recipe.build(list(model.parameters()))
    schedule = recipe.schedule(rounds * local_steps)
    data = module.batches(dtype)
    for step in range(rounds * local_steps):
        x, y = data[step % len(data)]
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * schedule(step)
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), recipe.clip_grad_norm)
        optimizer.step()
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def one_subnet(tmp_path_factory):
    path = tmp_path_factory.mktemp("one")
    module = _module(path)
    return path, module, _plain_loop(module, ROUNDS, LOCAL_STEPS)


def _assert_close(actual: dict, expected: dict, tol: float, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for name, e in expected.items():
        a = actual[name]
        assert a.shape == e.shape and a.dtype == e.dtype, f"{what} {name}"
        diff = float((a.double() - e.double()).abs().max()) if a.numel() else 0.0
        assert diff <= tol, f"{what} {name}: max diff {diff:.3e} > {tol:g}"


def test_one_subnet_local_backend_is_the_plain_loop(one_subnet):
    _, module, reference = one_subnet
    model = module.build_model()
    ist = istfx.compile(model, 1, example_inputs=module.example_inputs)
    recipe = TrainingRecipe(**RECIPE)
    istfx.fit(ist, module.batches(), rounds=ROUNDS, local_steps=LOCAL_STEPS, progress=False,
              **recipe.fit_kwargs(total_steps=ROUNDS * LOCAL_STEPS))
    _assert_close(dict(ist.model.state_dict()), reference, 1e-12, "local")
    # Without carrying the state, the moments restart every round: a different model (the check can fail).
    model = module.build_model()
    ist = istfx.compile(model, 1, example_inputs=module.example_inputs)
    istfx.fit(ist, module.batches(), rounds=ROUNDS, local_steps=LOCAL_STEPS, progress=False,
              **TrainingRecipe(**{**RECIPE, "optimizer_state": "reset"}).fit_kwargs(ROUNDS * LOCAL_STEPS))
    diff = max(float((ist.model.state_dict()[n] - t).abs().max()) for n, t in reference.items())
    assert diff > 1e-4


# DeepSpeed reduces only fp16, bf16 and fp32 gradients: its run is float32, against a float32 plain loop.
@pytest.mark.parametrize("backend, dtype, tol", [("ps", "float64", 1e-12), ("sharded", "float64", 1e-12),
                                                 ("deepspeed", "float32", 1e-6)])
def test_one_subnet_distributed_backend_is_the_plain_loop(one_subnet, backend, dtype, tol):
    path, module, reference = one_subnet
    if dtype != "float64":
        reference = _plain_loop(module, ROUNDS, LOCAL_STEPS, getattr(torch, dtype))
    (path / "run_one.py").write_text(RUNNER, encoding="utf-8")
    out = path / f"{backend}.safetensors"
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(path / "run_one.py"), str(path), backend, str(out),
                           json.dumps(RECIPE), str(ROUNDS), str(LOCAL_STEPS), dtype],
                          capture_output=True, text=True, timeout=240, env=env, cwd=path)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    tensors, _ = checkpoint.load_file(out)
    _assert_close(tensors, reference, tol, backend)


# -- (b) one command, every backend --------------------------------------------------------------------
NET = BN_MLP_MODEL_FILE

FLAGS = ["--subnets", "2", "--rounds", "3", "--local-steps", "3", "--batch-size", "32", "--threads", "1",
         "--eval-every", "3", "--seed", "3", "--quiet", "--optimizer", "adamw", "--lr", "0.01", "--weight-decay",
         "0.05", "--betas", "0.9,0.95", "--warmup-steps", "2", "--lr-schedule", "cosine", "--clip-grad-norm", "1.0",
         "--optimizer-state", "carry", "--outer-lr", "0.7", "--outer-momentum", "0.9"]


@pytest.fixture(scope="module")
def netdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("carry")
    (path / "net.py").write_text(NET, encoding="utf-8")
    return path


def _train(netdir: Path, name: str, *argv: str) -> dict[str, torch.Tensor]:
    out = netdir / f"{name}.safetensors"
    proc = subprocess.run([sys.executable, "-m", "istfx.cli.train", str(netdir / "net.py"), *FLAGS, *argv,
                           "--save", str(out), "--metrics", str(netdir / f"{name}.jsonl")],
                          capture_output=True, text=True, timeout=300, cwd=netdir)
    assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    tensors, _ = checkpoint.load_file(out)
    return tensors


@pytest.fixture(scope="module")
def local_reference(netdir):
    return _train(netdir, "local", "--backend", "local")


@pytest.mark.parametrize("name, argv", [
    ("ps", ["--backend", "torch", "--topology", "ps"]),
    ("sharded", ["--backend", "torch", "--topology", "sharded"]),
    ("deepspeed", ["--backend", "deepspeed", "--zero-stage", "0"]),
])
def test_one_command_every_backend_same_model(netdir, local_reference, name, argv):
    _assert_close(_train(netdir, name, *argv), local_reference, 1e-5, name)


def test_carry_and_outer_change_the_trajectory(netdir, local_reference):
    """The flags act: dropping the outer step (or the carried state) gives another model."""
    plain = _train(netdir, "local-plain", "--backend", "local", "--outer-lr", "1", "--outer-momentum", "0")
    diff = max(float((plain[n] - t).abs().max()) for n, t in local_reference.items() if t.is_floating_point())
    assert diff > 1e-3


# -- (c) the plain write-back ------------------------------------------------------------------------
def test_outer_lr1_momentum0_is_todays_write_back_bit_for_bit():
    def run(**kwargs):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
        ist = istfx.compile(model, 2, example_inputs=(torch.randn(4, 8),))
        generator = torch.Generator().manual_seed(1)
        data = [(torch.randn(16, 8, generator=generator), torch.randint(0, 4, (16,), generator=generator))
                for _ in range(6)]
        istfx.fit(ist, data, rounds=3, local_steps=2, progress=False,
                  optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), **kwargs)
        return {n: t.detach().clone() for n, t in ist.model.state_dict().items()}

    today = run()
    same = run(outer_lr=1.0, outer_momentum=0.0)
    assert all(torch.equal(today[n], same[n]) for n in today)
    stepped = run(outer_lr=0.7, outer_momentum=0.9)
    assert any(not torch.equal(today[n], stepped[n]) for n in today)


def test_carried_state_is_on_the_wire_and_in_the_byte_counts(netdir, local_reference):
    """ps: from round 1 on the worker receives and sends its AdamW moments too (twice its parameters);
    sharded: each rank keeps its slices' state and outer momentum next to them."""
    import json as _json

    _train(netdir, "ps-counts", "--backend", "torch", "--topology", "ps")
    rows = [_json.loads(line) for line in (netdir / "ps-counts.jsonl").read_text().splitlines() if line.strip()]
    params = rows[0]["bytes_per_subnet"][1]
    first, later = rows[0]["bytes_received"][1], rows[1]["bytes_received"][1]
    assert later - first >= 1.9 * params, (first, later, params)  # exp_avg + exp_avg_sq of every slice
    assert rows[1]["bytes_sent"][1] - rows[0]["bytes_sent"][1] >= 0  # the trained state goes back every round
    assert rows[0]["bytes_sent"][1] >= 2.9 * params  # update + trained moments already after round 0
    if not (netdir / "sharded.jsonl").exists():  # the cross-backend test wrote it when it ran first
        _train(netdir, "sharded", "--backend", "torch", "--topology", "sharded")
    rows = [_json.loads(line) for line in (netdir / "sharded.jsonl").read_text().splitlines() if line.strip()]
    assert max(rows[0]["state_bytes"]) < 2 * max(rows[0]["bytes_per_subnet"])  # round 0 starts with no state
    for row in rows[1:]:  # measured when the round starts: slices, homes and shared tensors with their state
        for rank, kept in enumerate(row["state_bytes"]):
            assert kept >= 3 * row["bytes_per_subnet"][rank], (row["round"], rank, kept)


GPT_FILE = '''
import torch
from istfx.models import GPT, GPTConfig
from istfx.models.gpt import lm_loss as loss_fn


def build_model():
    return GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16))  # tied embedding


example_inputs = (torch.randint(0, 32, (2, 8)),)


def train_batches(subnet, subnets, seed):
    generator = torch.Generator().manual_seed(seed * 100 + subnet)
    rows = torch.randint(0, 32, (6, 4, 9), generator=generator)
    return [(r[:, :-1], r[:, 1:]) for r in rows]
'''


def test_tied_gpt_carries_adamw_state_the_same_on_every_topology(tmp_path):
    (tmp_path / "gpt.py").write_text(GPT_FILE, encoding="utf-8")
    flags = ["--subnets", "2", "--rounds", "3", "--local-steps", "2", "--threads", "1", "--seed", "1", "--quiet",
             "--eval-every", "3", "--optimizer", "adamw", "--lr", "0.01", "--optimizer-state", "carry",
             "--outer-lr", "0.7", "--outer-momentum", "0.9", "--clip-grad-norm", "1.0"]
    models = {}
    for name, argv in (("local", ["--backend", "local"]), ("sharded", ["--topology", "sharded"]),
                       ("ps", ["--topology", "ps"])):
        out = tmp_path / f"{name}.safetensors"
        proc = subprocess.run([sys.executable, "-m", "istfx.cli.train", str(tmp_path / "gpt.py"), *flags, *argv,
                               "--save", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
        models[name], _ = checkpoint.load_file(out)
    _assert_close(models["sharded"], models["local"], 1e-5, "sharded")
    _assert_close(models["ps"], models["local"], 1e-5, "ps")
