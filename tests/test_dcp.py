"""Sharded checkpoints with torch.distributed.checkpoint, on gloo: 2-3 processes on 127.0.0.1 started by
``istfx train --topology sharded``.

- a checkpoint is one file per rank and tensor, shared tensors written once, and no rank ever holds the
  full model (each rank records the tensors it hands to DCP and whether its model was released);
- ``istfx export`` of a sharded ``--save`` equals the local backend's model;
- a checkpoint written by 2 ranks resumes on 3 (another number of subnets) and on 2 with the carried
  optimizer state and outer momentum, bit for bit equal to the uninterrupted run;
- a corrupt or missing chunk is refused with one line naming the file.
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
from conftest import BN_MLP_MODEL_FILE

from istfx.cli.train import main as train_main
from istfx.runtime import checkpoint, dcp_checkpoint

import sklearn  # noqa: F401  (the default data, scikit-learn's digits; in the test extra)

COMMON = ["--local-steps", "2", "--batch-size", "32", "--lr", "0.3", "--threads", "1",
          "--eval-every", "100", "--seed", "5", "--quiet", "--rounds"]
# COMMON ends with --rounds: a job appends how many
TIMEOUT = 900  # seconds per `istfx train` job: generous, the tests share a loaded machine

# Every rank records what it hands to DCP when saving (the largest row count of each tensor) and whether
# its model was released (no full copy) at that moment.
RECORDER = '''

import json as _json
import os as _os

from istfx.backends import torch_sharded as _ts
from istfx.backends.model_storage import is_released as _released
from istfx.runtime import dcp_checkpoint as _dcp

_save = _dcp.save


def _recording_save(directory, state):
    rank = int(_os.environ["RANK"])
    seen = {k: list((v.local if isinstance(v, _dcp.RowShard) else v).shape) for k, v in state.items()}
    backend_model_released = all(_released_flag)
    with open(_os.path.join(_os.environ["ISTFX_RECORD"], f"rank{rank}-{len(_os.listdir(_os.environ['ISTFX_RECORD']))}.json"), "w") as f:
        _json.dump({"rank": rank, "shapes": seen, "released": backend_model_released}, f)
    return _save(directory, state)


_released_flag = []
_write = _ts.TorchShardedBackend._write_dcp


def _write_dcp(self, directory, model_only=False):
    _released_flag[:] = [_released(self.ist)]
    return _write(self, directory, model_only)


_ts.TorchShardedBackend._write_dcp = _write_dcp
_dcp.save = _recording_save
'''


def _launch(workdir: Path, *argv: str, model: str = "net.py", env: dict | None = None,
            ok: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "istfx.cli.train", str(workdir / model), *argv, "--timeout", "120"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=workdir,
                          env={**os.environ, **(env or {})})
    if ok:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _export(source: Path, out: Path, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "istfx.cli", "export", str(source), "--out", str(out)],
                          capture_output=True, text=True, timeout=TIMEOUT)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def _load(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_file(path)[0]


def _assert_equal(actual: dict, expected: dict, close: set[str] = frozenset()) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        if name in close and value.is_floating_point():
            torch.testing.assert_close(actual[name], value, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(actual[name], value), name


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dcp")
    (path / "net.py").write_text(BN_MLP_MODEL_FILE, encoding="utf-8")
    (path / "recorded.py").write_text(BN_MLP_MODEL_FILE + RECORDER, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sharded(workdir):
    """Sharded on 2 ranks: checkpoints after rounds 1 and 3 (recorded), the model saved as a DCP directory."""
    record = workdir / "record"
    record.mkdir()
    _launch(workdir, "--subnets", "2", "--topology", "sharded", *COMMON, "4", "--checkpoint-dir", str(workdir / "ckpt"),
            "--checkpoint-every", "2", "--keep-checkpoints", "5", "--save", str(workdir / "final.dcp"),
            model="recorded.py", env={"ISTFX_RECORD": str(record)})
    return workdir


def test_every_rank_writes_its_rows_and_none_holds_the_model(sharded):
    ckpt = checkpoint.find(sharded / "ckpt")
    assert ckpt.format == dcp_checkpoint.FORMAT and ckpt.world_size == 2 and ckpt.round == 3
    table = ckpt.manifest["dcp"]["tensors"]
    files = sorted(p.name for p in (ckpt.path / dcp_checkpoint.DIRECTORY).iterdir())
    # one file per rank and tensor it wrote: ranks 1 and 2 (DCP counts from 1)
    assert {f.split("-model-")[0] for f in files} == {"shard-00001", "shard-00002"}
    for name in ("fc1.weight", "fc2.weight", "bn1.running_mean"):
        chunks = table[name]["chunks"]
        assert [c["offsets"][0] for c in chunks] == [0, table[name]["shape"][0] // 2]  # two row blocks
        assert len({c["file"] for c in chunks}) == 2
    for name in ("fc3.bias", "bn1.num_batches_tracked"):  # shared: written once
        assert len(table[name]["chunks"]) == 1
    assert not list(ckpt.path.glob("model.safetensors")) and not list(ckpt.path.rglob(".metadata"))
    records = [json.loads(p.read_text()) for p in (sharded / "record").iterdir()]
    assert {r["rank"] for r in records} == {0, 1} and len(records) == 2 * 3  # 2 checkpoints and the --save
    full = {"fc1.weight": [48, 64], "fc2.weight": [40, 48], "fc3.weight": [10, 40]}
    for r in records:
        assert r["released"], "a rank held the full model while saving"
        for name, shape in full.items():
            rows = r["shapes"][name][0]
            assert rows == -(-shape[0] // 2) or rows == shape[0] - -(-shape[0] // 2), (name, rows)
            assert rows < shape[0]


def test_export_of_a_sharded_save_equals_the_local_run(sharded, workdir):
    local = workdir / "local.safetensors"
    assert train_main([str(workdir / "net.py"), "--subnets", "2", "--backend", "local", *COMMON, "4",
                       "--save", str(local)]) == 0
    out = workdir / "exported.safetensors"
    _export(workdir / "final.dcp", out)
    exported = _load(out)  # TensorFile checks the CRCs export wrote
    _assert_equal(exported, _load(local), close={"fc3.bias", "bn1.num_batches_tracked"})
    # a checkpoint round exports the same way, and equals what the checkpoint loads into a model
    _export(sharded / "ckpt", workdir / "from_ckpt.safetensors")
    _assert_equal(_load(workdir / "from_ckpt.safetensors"), exported)


def test_resume_on_another_number_of_ranks(sharded, workdir):
    """Written by 2 ranks after round 1; loaded by 3 (S = 3: another plan), dealt and written back unchanged;
    then 3 ranks train on from it."""
    resumed = workdir / "on3"
    shutil.copytree(sharded / "ckpt" / "round-000001", resumed / "ckpt" / "round-000001")
    args = ["--subnets", "3", "--topology", "sharded", *COMMON, "2",
            "--checkpoint-dir", str(resumed / "ckpt"), "--resume", "--save", str(resumed / "same.dcp")]
    _launch(workdir, *args)  # --rounds 2: nothing left to train, the model goes straight back out
    _export(resumed / "same.dcp", resumed / "same.safetensors")
    _export(resumed / "ckpt" / "round-000001", resumed / "written.safetensors")
    _assert_equal(_load(resumed / "same.safetensors"), _load(resumed / "written.safetensors"))
    _launch(workdir, "--subnets", "3", "--topology", "sharded", *COMMON, "4", "--checkpoint-dir", str(resumed / "ckpt"),
            "--resume", "--save", str(resumed / "final.safetensors"), "--metrics", str(resumed / "m.jsonl"))
    rows = [json.loads(line) for line in (resumed / "m.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [2, 3] and all(len(r["bytes_sent"]) == 3 for r in rows)
    final = _load(resumed / "final.safetensors")
    assert not torch.equal(final["fc2.weight"], _load(resumed / "same.safetensors")["fc2.weight"])


def test_resume_with_carried_state_and_outer_momentum_is_bit_for_bit(workdir):
    state = ["--optimizer-state", "carry", "--outer-lr", "0.7", "--outer-momentum", "0.9"]
    base = workdir / "carry"
    _launch(workdir, "--subnets", "2", "--topology", "sharded", *COMMON, "4", *state, "--checkpoint-dir",
            str(base / "ckpt"), "--checkpoint-every", "2", "--keep-checkpoints", "5",
            "--save", str(base / "final.safetensors"))
    manifest = checkpoint.find(base / "ckpt" / "round-000001").manifest
    assert manifest["carried_state"] and "outer_momentum" in manifest["state_keys"]
    assert "momentum_buffer" in manifest["state_keys"]
    resumed = base / "resumed"
    shutil.copytree(base / "ckpt" / "round-000001", resumed / "ckpt" / "round-000001")
    _launch(workdir, "--subnets", "2", "--topology", "sharded", *COMMON, "4", *state, "--checkpoint-dir",
            str(resumed / "ckpt"), "--resume", "--save", str(resumed / "final.safetensors"))
    _assert_equal(_load(resumed / "final.safetensors"), _load(base / "final.safetensors"))


def _chunk_file(ckpt_dir: Path, name: str) -> Path:
    ckpt = checkpoint.find(ckpt_dir)
    chunk = ckpt.manifest["dcp"]["tensors"][name]["chunks"][-1]
    return ckpt.path / dcp_checkpoint.DIRECTORY / chunk["file"]


def test_a_corrupt_or_missing_chunk_is_refused_naming_the_file(sharded, workdir):
    bad = workdir / "corrupt"
    shutil.copytree(sharded / "ckpt" / "round-000003", bad / "ckpt" / "round-000003")
    target = _chunk_file(bad / "ckpt", "fc2.weight")
    data = bytearray(target.read_bytes())
    data[-5] ^= 0x01  # a low mantissa bit of the last float: finite, but not what was written
    target.write_bytes(bytes(data))
    proc = _export(bad / "ckpt", workdir / "never.safetensors", ok=False)
    assert proc.returncode == 2 and not (workdir / "never.safetensors").exists()
    line = proc.stderr.strip().splitlines()[-1]
    assert str(target) in line and "checksum" in line and "Traceback" not in proc.stderr
    proc = _launch(workdir, "--subnets", "2", "--topology", "sharded", *COMMON, "6",
                   "--checkpoint-dir", str(bad / "ckpt"), "--resume", ok=False)
    assert proc.returncode != 0 and target.name in proc.stderr and "checksum" in proc.stderr
    target.unlink()
    proc = _export(bad / "ckpt", workdir / "never.safetensors", ok=False)
    assert proc.returncode == 2 and "cannot be opened" in proc.stderr and target.name in proc.stderr
