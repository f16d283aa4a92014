"""The torch.distributed backend on gloo, 2-3 processes on 127.0.0.1, started by ``istfx train``.

- ``ps`` and ``sharded`` reproduce the local backend (same seed, same data
  shards): split tensors bit for bit, shared ones within float tolerance;
- a resumed run ends bit for bit where the uninterrupted one did;
- the bytes each rank reports are the bytes the exchange must move;
- faults (``ps``): a NaN update is rejected, a killed rank and a hung rank
  are left out and excluded, and the job finishes. Faults are injected through
  the backends' ``after_local_training`` hook, which the model file of a
  faulty run overrides on every rank (:func:`_faulty_model`);
- compressed exchange: quantization error bounds and sizes.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BN_MLP_MODEL_FILE

import istfx
from istfx.runtime import checkpoint, comm
from istfx.cli.loader import load_model_file
from istfx.cli.train import main as train_main

import sklearn  # noqa: F401  (the default data, scikit-learn's digits; in the test extra)

assert torch.distributed.is_available() and torch.distributed.is_gloo_available(), \
    "the torch backend runs on torch.distributed with gloo; this torch build has neither"

MODEL = BN_MLP_MODEL_FILE

FAULTS = '''

# -- fault injection: strikes on every rank after local training, before the update leaves the rank
import math as _math
import os as _os
import time as _time

from istfx.backends.torch_base import TorchDistBackend as _Base

_FAULTS = {faults!r}  # (kind, rank, round, seconds)


def _strike(backend, round, subnet):
    for kind, rank, at, seconds in _FAULTS:
        if rank != backend.rank or at != round:
            continue
        if kind == "kill":
            _os._exit(17)
        elif kind == "hang":
            _time.sleep(seconds)
        elif kind == "nan":
            with torch.no_grad():
                next(p for p in subnet.parameters() if p.is_floating_point()).fill_(_math.nan)


_Base.after_local_training = _strike
'''

ROUNDS = 4
COMMON = ["--rounds", str(ROUNDS), "--local-steps", "3", "--batch-size", "32", "--lr", "0.5", "--threads", "1",
          "--eval-every", "2", "--seed", "3", "--quiet"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist")
    (path / "net.py").write_text(MODEL, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def compiled(workdir):
    torch.manual_seed(3)
    loaded = load_model_file(workdir / "net.py")
    return istfx.compile(loaded.model, 2, example_inputs=loaded.example_inputs, seed=3)


LAUNCH_TIMEOUT = 400  # seconds for one `istfx train` job: generous, as the tests share a loaded machine


def _launch(workdir: Path, *argv: str, env: dict | None = None, timeout: float = LAUNCH_TIMEOUT,
            model: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "istfx.cli.train", str(model or workdir / "net.py"), *argv]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=workdir)
    assert proc.returncode == 0, \
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def _faulty_model(workdir: Path, name: str, *faults: tuple) -> Path:
    """The test model plus fault injection: ``("kill", rank, round)``, ``("hang", rank, round, seconds)``
    or ``("nan", rank, round)`` strike that rank right after its local training of that round."""
    entries = [(kind, rank, round, float(rest[0]) if rest else 0.0) for kind, rank, round, *rest in faults]
    path = workdir / f"{name}.py"
    path.write_text(MODEL + FAULTS.format(faults=entries), encoding="utf-8")
    return path


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _load(path: Path) -> dict[str, torch.Tensor]:
    tensors, _ = checkpoint.load_file(path)
    return tensors


@pytest.fixture(scope="module")
def local_run(workdir):
    """The local backend's result: the reference both topologies must reproduce."""
    threads = torch.get_num_threads()
    try:
        out = workdir / "local.safetensors"
        code = train_main([str(workdir / "net.py"), "--subnets", "2", "--backend", "local", *COMMON,
                           "--save", str(out), "--metrics", str(workdir / "local.jsonl")])
        assert code == 0
    finally:
        torch.set_num_threads(threads)
    return _load(out), _metrics(workdir / "local.jsonl")


def _run_topology(workdir: Path, topology: str) -> dict:
    """An uninterrupted run with checkpoints after rounds 1 and 3, then a resume from round 1."""
    base = workdir / topology
    base.mkdir()
    env = {"ISTFX_EXCHANGE_CHUNK": "50"}  # the sharded exchange then works through many small row blocks
    _launch(workdir, "--subnets", "2", "--topology", topology, *COMMON, "--save", str(base / "final.safetensors"),
            "--metrics", str(base / "metrics.jsonl"), "--checkpoint-dir", str(base / "ckpt"),
            "--checkpoint-every", "2", "--keep-checkpoints", "5", env=env)
    resumed = base / "resumed"
    shutil.copytree(base / "ckpt" / "round-000001", resumed / "ckpt" / "round-000001")
    _launch(workdir, "--subnets", "2", "--topology", topology, *COMMON, "--save", str(resumed / "final.safetensors"),
            "--checkpoint-dir", str(resumed / "ckpt"), "--checkpoint-every", "2", "--resume")
    return {
        "final": _load(base / "final.safetensors"),
        "resumed": _load(resumed / "final.safetensors"),
        "metrics": _metrics(base / "metrics.jsonl"),
        "ckpt": base / "ckpt",
    }


@pytest.fixture(scope="module")
def ps_run(workdir):
    return _run_topology(workdir, "ps")


@pytest.fixture(scope="module")
def sharded_run(workdir):
    return _run_topology(workdir, "sharded")


def _assert_same(actual: dict, expected: dict, shared_ok: set[str] = frozenset(), what: str = "") -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        a, e = actual[name], expected[name]
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what} {name}"
        if name in shared_ok and a.is_floating_point():
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=f"{what} {name}")
        else:
            assert torch.equal(a, e), f"{what} {name}: max diff {(a.double() - e.double()).abs().max():.3e}"


# -- equivalence with the local backend --------------------------------------------------------
def test_ps_reproduces_local_backend_bit_for_bit(ps_run, local_run):
    reference, local_metrics = local_run
    _assert_same(ps_run["final"], reference, what="ps vs local")
    for row, ref in zip(ps_run["metrics"], local_metrics):
        assert row["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-12)
        assert row["eval_accuracy"] == ref["eval_accuracy"]


def test_sharded_reproduces_local_backend(sharded_run, local_run, compiled):
    reference, local_metrics = local_run
    slices = compiled.slices(0)
    shared = {n for n in compiled.trainable_state if not slices.is_cut(n)}
    assert shared == {"bn1.num_batches_tracked", "fc3.bias"}
    # fc2.weight is cut along both axes: its off-diagonal blocks live at their home ranks
    assert [i is not None for i in slices.indices[0]["fc2.weight"]] == [True, True]
    _assert_same(sharded_run["final"], reference, shared_ok=shared, what="sharded vs local")
    for row, ref in zip(sharded_run["metrics"], local_metrics):
        assert row["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-6)


# -- resume ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("topology", ["ps", "sharded"])
def test_resume_continues_the_same_trajectory(topology, request):
    run = request.getfixturevalue(f"{topology}_run")
    _assert_same(run["resumed"], run["final"], what=f"{topology} resumed vs uninterrupted")


def test_sharded_checkpoint_is_written_without_gathering(sharded_run, compiled):
    ckpt = checkpoint.find(sharded_run["ckpt"])
    assert ckpt.format == checkpoint.DCP and ckpt.round == ROUNDS - 1 and ckpt.world_size == 2
    assert not checkpoint.model_file(ckpt.path).exists()
    meta, _ = ckpt.rank_state(1)
    assert "data_positions" in meta
    chunks = ckpt.manifest["dcp"]["tensors"]["fc2.weight"]["chunks"]
    assert [c["sizes"] for c in chunks] == [[20, 48], [20, 48]]  # each rank wrote its own rows
    assert len(ckpt.manifest["dcp"]["tensors"]["fc3.bias"]["chunks"]) == 1  # shared tensors once
    _assert_same(ckpt.model_state(), sharded_run["final"], what="the checkpoint's model")


# -- communication accounting ----------------------------------------------------------------------
def test_ps_bytes_are_the_subnets_both_ways(ps_run, compiled):
    param_bytes = sum(p.numel() * p.element_size() for p in compiled.model.parameters())
    for row in ps_run["metrics"]:
        subnets = compiled.decompose(row["round"])
        payloads = [comm.packed_nbytes(comm.specs([dict(s.named_parameters(), **dict(s.named_buffers()))[n]
                                                   for n in compiled.trainable_state])) for s in subnets]
        # header (kind, round, optimizer-state layout and size, slot, slots for this rank: 6 int64) + subnet;
        # no optimizer state travels here
        assert row["bytes_received"][1] == 48 + payloads[1]
        assert row["bytes_sent"][1] == 96 + payloads[1]  # result header + trained subnet
        assert row["bytes_sent"][0] == 48 + payloads[1]
        assert row["ddp_bytes_per_rank"] == pytest.approx(3 * 2 * (2 - 1) / 2 * param_bytes)
        assert row["local_sgd_bytes_per_rank"] == pytest.approx(param_bytes)
        assert row["failed"] == {} and row["missing"] == []


def _expected_exchange(ist, previous: int, round: int, world: int) -> tuple[list[int], list[int]]:
    """Bytes each rank must send/receive to move every element to its next holder (brute force)."""
    sp, sn = ist.slices(previous), ist.slices(round)
    sent, received = [0] * world, [0] * world
    for name in ist.trainable_state:
        if not sp.is_cut(name):
            continue
        full = ist.state_tensor(name)
        shape = full.shape
        cut = [d for d, i in enumerate(sp.indices[0][name]) if i is not None]

        def holders(slices):
            owner = torch.full(shape, -1, dtype=torch.long)
            for s in range(world):
                index = slices.indices[s][name]
                grids = torch.meshgrid(*[torch.arange(n) if i is None else i for n, i in zip(shape, index)],
                                       indexing="ij")
                owner[grids] = s
            return owner

        rows = shape[0]
        sizes = [rows // world + (1 if r < rows % world else 0) for r in range(world)]
        home_of_row = torch.repeat_interleave(torch.arange(world), torch.tensor(sizes))
        home = home_of_row.view(-1, *[1] * (len(shape) - 1)).expand(shape)
        hp, hn = holders(sp), holders(sn)
        src = torch.where(hp >= 0, hp, home)
        dst = torch.where(hn >= 0, hn, home)
        moved = src != dst
        for j in range(world):
            sent[j] += int((moved & (src == j)).sum()) * full.element_size()
            received[j] += int((moved & (dst == j)).sum()) * full.element_size()
        assert len(cut) >= 1
    return sent, received


def test_sharded_moves_exactly_the_units_that_change_rank(sharded_run, compiled):
    rows = sharded_run["metrics"]
    assert rows[0]["exchange_bytes_sent"] == [0, 0]  # round 0 starts from each rank's own rows
    for row in rows[1:]:
        sent, received = _expected_exchange(compiled, row["round"] - 1, row["round"], 2)
        assert row["exchange_bytes_sent"] == sent
        assert row["exchange_bytes_received"] == received
    # Per rank and round the sharded exchange moves less than one subnet; ps moves it twice.
    subnet = max(rows[-1]["bytes_per_subnet"])
    assert max(rows[-1]["exchange_bytes_sent"]) < subnet
    assert all(max(r["bytes_sent"]) < r["ddp_bytes_per_rank"] / 5 for r in rows)


# -- faults ---------------------------------------------------------------------------------------------
def test_ps_survives_nan_update_killed_and_hung_ranks(workdir):
    """Also runs the compressed ps exchange (int4 weights down, int4 updates up)."""
    out = workdir / "faults"
    out.mkdir()
    model = _faulty_model(workdir, "net_ps_faults", ("nan", 1, 0), ("kill", 2, 1), ("hang", 1, 2, 15))
    proc = _launch(workdir, "--subnets", "3", "--topology", "ps", "--rounds", "5", "--local-steps", "4",
                   "--lr", "0.5", "--threads", "1", "--round-timeout", "10", "--heartbeat-timeout", "5",
                   "--eval-every", "5", "--compress", "int4", "--metrics", str(out / "m.jsonl"),
                   "--save", str(out / "final.safetensors"), model=model)
    rows = _metrics(out / "m.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["rejected"] == [1] and "non-finite" in rows[0]["rejected_reasons"]["1"]
    # the launcher saw rank 2 exit and told rank 0 within the round; its slot goes to rank 1 from round 2
    assert list(rows[1]["failed"]) == ["2"] and "exited with status 17" in rows[1]["failed"]["2"]
    assert rows[1]["missing"] == [2] and rows[2]["dealt"] == {"2": 1}
    assert list(rows[2]["failed"]) == ["1"] and "timeout" in rows[2]["failed"]["1"]
    assert rows[2]["missing"] == [1, 2] and rows[4]["excluded"] == [1, 2]
    assert rows[4]["missing"] == [] and rows[4]["dealt"] == {"1": 0, "2": 0}  # no unit goes untrained
    assert rows[4]["bytes_sent"][0] == 0  # rank 0 trains every slot once both are excluded
    final = _load(out / "final.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values() if t.is_floating_point())
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert "left out" in proc.stdout


def test_sharded_rejects_nan_update_and_compresses(workdir, compiled):
    out = workdir / "sharded-int8"
    out.mkdir()
    _launch(workdir, "--subnets", "2", "--topology", "sharded", "--compress", "int8", *COMMON,
            "--metrics", str(out / "m.jsonl"), "--save", str(out / "final.safetensors"),
            model=_faulty_model(workdir, "net_nan_1_1", ("nan", 1, 1)))
    rows = _metrics(out / "m.jsonl")
    assert rows[1]["rejected"] == [1] and rows[0]["rejected"] == [] and rows[2]["rejected"] == []
    final = _load(out / "final.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values() if t.is_floating_point())
    for row in rows[1:]:
        exact, _ = _expected_exchange(compiled, row["round"] - 1, row["round"], 2)
        for measured, full in zip(row["exchange_bytes_sent"], exact):
            assert measured < 0.4 * full  # 1 byte per element plus a float32 scale per row
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_sharded_stops_with_a_clear_error_when_a_rank_dies(workdir):
    model = _faulty_model(workdir, "net_kill_1_1", ("kill", 1, 1))
    command = [sys.executable, "-m", "istfx.cli.train", str(model), "--subnets", "2",
               "--topology", "sharded", *COMMON]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, cwd=workdir,
                          env=os.environ)
    assert proc.returncode != 0
    assert "--resume" in proc.stderr and "cannot go on" in proc.stderr


# -- compression ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,qmax", [("int8", 127), ("int4", 7)])
def test_quantization_error_is_at_most_half_a_step_per_row(mode, qmax):
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(33, 17, generator=gen) * torch.logspace(-3, 2, 33)[:, None],
               torch.randn(5, 3, 4, generator=gen), torch.randn(129, generator=gen), torch.randn((), generator=gen),
               torch.zeros(4, 6), torch.arange(7)]
    specs = comm.specs(tensors)
    buffer = comm.pack(tensors, mode)
    assert buffer.dtype == torch.uint8 and buffer.numel() == comm.packed_nbytes(specs, mode)
    restored = comm.unpack(buffer, specs, mode)
    for x, y in zip(tensors, restored):
        assert y.shape == x.shape and y.dtype == x.dtype
        if not x.is_floating_point():
            assert torch.equal(x, y)
            continue
        rows = x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(-1)
        err = (x - y).reshape(rows.shape).abs()
        if x.dim() >= 2:
            bound = rows.abs().amax(dim=1, keepdim=True) / qmax / 2
        else:  # vectors: groups of comm.GROUP elements
            flat = x.reshape(-1)
            groups = torch.nn.functional.pad(flat, (0, (-flat.numel()) % comm.GROUP)).view(-1, comm.GROUP)
            bound = groups.abs().amax(dim=1).repeat_interleave(comm.GROUP)[: flat.numel()] / qmax / 2
        assert torch.all(err <= bound * (1 + 1e-5) + 1e-12)
    big = [torch.randn(256, 256, generator=gen)]
    ratio = comm.packed_nbytes(comm.specs(big), mode) / comm.packed_nbytes(comm.specs(big))
    assert ratio == pytest.approx((1 if mode == "int8" else 0.5) / 4 + 1 / 256)  # codes + a float32 scale per row


def test_quantized_non_finite_rows_stay_non_finite():
    x = torch.randn(4, 8)
    x[1, 3] = math.nan
    x[2, 0] = math.inf
    for mode in ("int8", "int4"):
        y = comm.unpack(comm.pack([x], mode), comm.specs([x]), mode)[0]
        assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
        assert torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()


def test_raw_packing_round_trips_every_dtype():
    tensors = [torch.randn(3, 5), torch.randn(4, dtype=torch.float64), torch.arange(6).view(2, 3),
               torch.tensor([True, False, True]), torch.randn(2, 2).to(torch.bfloat16), torch.empty(0, 4)]
    restored = comm.unpack(comm.pack(tensors), comm.specs(tensors))
    for x, y in zip(tensors, restored):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert comm.pack(tensors).numel() == sum(t.numel() * t.element_size() for t in tensors)


def test_accounting_formulas():
    assert comm.ring_allreduce_bytes(1000, 4) == 1500
    assert comm.ring_allreduce_bytes(1000, 1) == 0
    assert comm.data_parallel_bytes(1000, 4, steps=10) == 15000
    assert comm.local_sgd_bytes(1000, 4) == 1500
    assert comm.parse_compress("none") is None and comm.parse_compress("INT4") == "int4"
    with pytest.raises(ValueError):
        comm.parse_compress("int2")


# -- usage errors ---------------------------------------------------------------------------------------------
def test_backend_refuses_to_run_outside_a_launcher(compiled, monkeypatch):
    from istfx.backends import TorchDistBackend, get_backend
    from istfx.errors import ISTError

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert isinstance(get_backend("torch"), TorchDistBackend)
    with pytest.raises(ISTError, match="torchrun"):
        TorchDistBackend("sharded").prepare(compiled)
    with pytest.raises(ISTError, match="topology"):
        TorchDistBackend("ring")
    with pytest.raises(ISTError, match="compression"):
        TorchDistBackend("ps", compress="int2")


def test_torch_backend_builds_one_class_per_topology():
    from istfx.backends import TorchDistBackend, TorchPSBackend, TorchShardedBackend
    from istfx.errors import ISTError

    ps = TorchDistBackend("ps", compress="int8", round_timeout=5, heartbeat_timeout=None)
    assert type(ps) is TorchPSBackend and ps.topology == "ps" and ps.round_timeout == 5.0
    assert ps.compress == "int8" and ps.heartbeat_timeout is None
    sharded = TorchDistBackend(topology=" Sharded ", round_timeout=5)  # the CLI passes ps options to both
    assert type(sharded) is TorchShardedBackend and isinstance(sharded, TorchDistBackend)
    assert type(TorchDistBackend()) is TorchPSBackend and TorchShardedBackend().topology == "sharded"
    with pytest.raises(ISTError, match="runs the 'ps' topology"):
        TorchPSBackend("sharded")


def test_world_check_only_checks(monkeypatch):
    from istfx.backends import TorchDistBackend
    from istfx.errors import ISTError

    monkeypatch.setenv("WORLD_SIZE", "3")
    backend = TorchDistBackend("sharded")
    with pytest.raises(ISTError, match="world size 3 != 2 subnets"):
        backend.check_world(2)
    backend.check_world(3)
    assert not torch.distributed.is_initialized()  # no process group, no sub-group was created

