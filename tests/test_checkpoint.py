"""Checkpoints: atomic safetensors files, the newest complete checkpoint, and bit-for-bit resume (local).

The distributed resume (ps and sharded) is in ``test_distributed.py``.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import istfx
from istfx.runtime import checkpoint
from istfx.errors import ISTError
from istfx.runtime.training import fit


class DropNet(nn.Module):
    """Dropout makes the trajectory depend on the RNG state, which a checkpoint must carry."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(32, 24)
        self.fc3 = nn.Linear(24, 5)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(self.drop(torch.relu(self.fc1(x))))))


def _data(seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(200, 16, generator=g), torch.randint(0, 5, (200,), generator=g))


def _shared_loader():
    return DataLoader(_data(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(7))


def _per_subnet(subnet: int):
    return DataLoader(_data(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(100 + subnet))


def _train(root, rounds: int, data, *, resume=False, every: int = 2, subnets: int = 3, seed: int = 5):
    torch.manual_seed(0)
    ist = istfx.compile(DropNet(), subnets=subnets, example_inputs=(torch.randn(4, 16),), seed=seed)
    torch.manual_seed(1234)  # the training RNG (dropout); a resumed run takes it from the checkpoint
    history = fit(ist, data, rounds=rounds, local_steps=3,
                  optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                  checkpoint_dir=root, checkpoint_every=every, resume=resume, keep_checkpoints=None,
                  progress=False)
    return {k: v.detach().clone() for k, v in ist.model.state_dict().items()}, history


@pytest.mark.parametrize("data", [_shared_loader, _per_subnet], ids=["one-loader", "per-subnet"])
def test_local_resume_is_bit_for_bit(tmp_path, data):
    source = data() if data is _shared_loader else data
    full, full_history = _train(tmp_path / "a", 6, source)
    assert [row["round"] for row in full_history] == list(range(6))
    # Interrupted after round 2 (the last round of a run is always saved), then resumed to 6.
    source = data() if data is _shared_loader else data
    _train(tmp_path / "b", 3, source, every=5)
    assert checkpoint.find(tmp_path / "b").round == 2
    source = data() if data is _shared_loader else data
    resumed, history = _train(tmp_path / "b", 6, source, resume=True)
    assert [row["round"] for row in history] == [3, 4, 5]
    assert history[-1]["samples_total"] == full_history[-1]["samples_total"]
    assert [row["train_loss"] for row in history] == [row["train_loss"] for row in full_history[3:]]
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    state, history = _train(tmp_path / "empty", 2, _per_subnet, resume=True)
    assert [row["round"] for row in history] == [0, 1]
    assert checkpoint.find(tmp_path / "empty").round == 1


def test_resume_refuses_another_seed_or_subnet_count(tmp_path):
    _train(tmp_path, 2, _per_subnet)
    with pytest.raises(ISTError, match="seed"):
        _train(tmp_path, 4, _per_subnet, resume=True, seed=6)
    with pytest.raises(ISTError, match="subnets"):
        _train(tmp_path, 4, _per_subnet, resume=True, subnets=2)


def test_checkpoint_layout_and_manifest(tmp_path):
    _train(tmp_path, 4, _per_subnet, every=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "round-000001", "round-000003"]
    assert (tmp_path / "latest").read_text().strip() == "round-000003"
    ckpt = checkpoint.find(tmp_path)
    assert ckpt.round == 3 and ckpt.next_round == 4 and ckpt.format == checkpoint.FULL
    manifest = json.loads((ckpt.path / "manifest.json").read_text())
    assert manifest["subnets"] == 3 and manifest["seed"] == 5 and manifest["samples_total"] > 4 * 3 * 3 * 8
    meta, tensors = ckpt.rank_state(0)
    assert meta["data_positions"] == {"0": 12, "1": 12, "2": 12}
    assert "rng/cpu" in tensors
    state = ckpt.model_state()
    assert set(state) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"}
    assert not [p for p in ckpt.path.iterdir() if p.name.endswith(".tmp")]


def test_find_skips_incomplete_checkpoints_and_prune_keeps_the_newest(tmp_path):
    for r in (1, 3, 5):
        directory = checkpoint.round_dir(tmp_path, r)
        checkpoint.atomic_save({"w": torch.full((2,), float(r))}, checkpoint.model_file(directory))
        checkpoint.write_manifest(tmp_path, r, {"format": "full"})
    # A save that died before its manifest: never picked.
    checkpoint.atomic_save({"w": torch.zeros(2)}, checkpoint.model_file(checkpoint.round_dir(tmp_path, 7)))
    (tmp_path / "latest").write_text("round-000007\n")
    assert checkpoint.find(tmp_path).round == 5
    assert checkpoint.find(checkpoint.round_dir(tmp_path, 3)).round == 3
    assert checkpoint.find(tmp_path / "nothing") is None
    removed = checkpoint.prune(tmp_path, keep=2)
    assert [p.name for p in removed] == ["round-000001"]
    assert checkpoint.find(tmp_path).model_state()["w"].tolist() == [5.0, 5.0]


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    checkpoint.atomic_save({"w": torch.ones(3)}, path, {"round": 1})
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        checkpoint.atomic_save({"w": torch.zeros(3)}, path)
    tensors, meta = checkpoint.load_file(path)
    assert tensors["w"].tolist() == [1.0, 1.0, 1.0] and meta == {"round": 1}
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_atomic_save_stores_tensors_that_share_memory(tmp_path):
    base = torch.arange(12.0)
    index = torch.tensor([3, 1])
    path = tmp_path / "s.safetensors"
    checkpoint.atomic_save({"a": base[2:5], "b": index, "c": index, "d": base}, path)
    tensors, _ = checkpoint.load_file(path)
    assert tensors["a"].tolist() == [2.0, 3.0, 4.0] and torch.equal(tensors["c"], index)


def test_read_rows_reads_requested_rows_in_order(tmp_path):
    full = torch.arange(40.0).view(10, 4)
    other = torch.arange(6, dtype=torch.int64).view(3, 2)
    path = tmp_path / "r.safetensors"
    checkpoint.atomic_save({"w": full, "i": other, "h": full.to(torch.bfloat16)}, path)
    with checkpoint.TensorFile(path) as handle:
        for rows in ([7, 2, 3, 9, 3, 0], [1, 2, 3], [9], list(range(10))):
            rows = torch.tensor(rows)
            assert torch.equal(checkpoint.read_rows(handle, "w", rows), full[rows])
            assert torch.equal(handle.rows("h", rows), full.to(torch.bfloat16)[rows])
        assert checkpoint.read_rows(handle, "w", torch.tensor([], dtype=torch.long)).shape == (0, 4)
        assert torch.equal(checkpoint.read_rows(handle, "w", None), full)
        assert torch.equal(handle.rows("i", torch.tensor([2, 0])), other[[2, 0]])
    assert torch.equal(checkpoint.read_rows(path, "w", torch.tensor([4])), full[4:5])


def test_load_into_refuses_another_model(tmp_path):
    _train(tmp_path, 2, _per_subnet)
    other = istfx.compile(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 5)), subnets=2,
                          example_inputs=(torch.randn(4, 16),))
    with pytest.raises(ISTError, match="lacks"):
        checkpoint.load_into(other, tmp_path)
