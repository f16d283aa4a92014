"""Corrupt, foreign and incomplete checkpoints: each is refused with one line naming the file, model unchanged.

One complete checkpoint (local backend, after round 1) is damaged in one way
per case; resuming from it (``fit(..., resume=True)``) and loading it
(:func:`istfx.runtime.checkpoint.load_into`) must raise a
:class:`~istfx.runtime.checkpoint.CheckpointError` whose single-line message
names the damaged file, and leave the model's weights as they were.
"""
from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import istfx
from istfx.runtime import checkpoint
from istfx.runtime.training import fit


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _compiled():
    torch.manual_seed(0)
    return istfx.compile(Net(), subnets=2, example_inputs=(torch.randn(4, 8),), seed=3)


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    fit(_compiled(), _batches(), rounds=2, local_steps=2, checkpoint_dir=root, checkpoint_every=2,
        progress=False)
    return root


# -- the damage -----------------------------------------------------------------------------------
def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    return size, json.loads(raw[8:8 + size])


def _rewrite_header(path: Path, edit: Callable[[dict], None]) -> None:
    raw = path.read_bytes()
    size, header = _header(path)
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * ((-len(text)) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size:])


def flipped_bytes(d: Path) -> Path:
    path = d / "model.safetensors"
    size, header = _header(path)
    begin, _ = header["fc1.weight"]["data_offsets"]
    raw = bytearray(path.read_bytes())
    raw[8 + size + begin + 5] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


def nan_with_recomputed_checksum(d: Path) -> Path:
    """NaN written into a tensor, the file and the manifest then made consistent again: only the values
    can tell."""
    path = d / "model.safetensors"
    with checkpoint.TensorFile(path) as handle:
        tensors, meta = handle.load_all()
    tensors["fc2.weight"][1, 2] = float("nan")
    checkpoint.atomic_save(tensors, path, meta)
    manifest = json.loads((d / "manifest.json").read_text())
    with checkpoint.TensorFile(path) as handle:
        manifest["files"]["model.safetensors"] = handle.checksums
    (d / "manifest.json").write_text(json.dumps(manifest))
    return path


def reversed_offsets(d: Path) -> Path:
    path = d / "model.safetensors"
    _rewrite_header(path, lambda h: h["fc1.bias"].__setitem__("data_offsets", h["fc1.bias"]["data_offsets"][::-1]))
    return path


def huge_header_length(d: Path) -> Path:
    path = d / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2 ** 62) + raw[8:])
    return path


def truncated(d: Path) -> Path:
    path = d / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 40])
    return path


def garbage_manifest(d: Path) -> Path:
    path = d / "manifest.json"
    path.write_bytes(b'{"round": 1, "next_round": \x00\xff garbage')
    return path


def foreign_file(d: Path) -> Path:
    """A safetensors file from elsewhere, with the same tensor names and shapes, in place of the model's."""
    path = d / "model.safetensors"
    with checkpoint.TensorFile(path) as handle:
        shapes = {name: handle.shape(name) for name in handle.keys()}
    save_file({name: torch.ones(shape) for name, shape in shapes.items()}, str(path))
    return path


def missing_rank_file(d: Path) -> Path:
    path = d / "rank-00000.safetensors"
    path.unlink()
    return path


def missing_model_file(d: Path) -> Path:
    path = d / "model.safetensors"
    path.unlink()
    return path


def missing_manifest(d: Path) -> Path:
    """The manifest is gone: this directory is no checkpoint (loading it directly names the file)."""
    path = d / "manifest.json"
    path.unlink()
    return path


CASES = [flipped_bytes, nan_with_recomputed_checksum, reversed_offsets, huge_header_length, truncated,
         garbage_manifest, foreign_file, missing_rank_file, missing_model_file, missing_manifest]
WHAT = {
    flipped_bytes: "fails its checksum",
    nan_with_recomputed_checksum: "non-finite",
    reversed_offsets: "data_offsets",
    huge_header_length: "header length",
    truncated: "data_offsets",  # the last tensor's bytes lie past the end of the file
    garbage_manifest: "not valid JSON",
    foreign_file: "differ from the manifest",
    missing_rank_file: "missing",
    missing_model_file: "missing",
    missing_manifest: "no manifest.json",
}


def _damaged(pristine: Path, tmp_path: Path, damage) -> tuple[Path, Path, Path]:
    root = tmp_path / "ckpt"
    shutil.copytree(pristine, root)
    directory = checkpoint.round_dir(root, 1)
    return root, directory, damage(directory)


def _weights(ist) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in ist.model.state_dict().items()}


def _assert_one_line_naming(err: pytest.ExceptionInfo, path: Path, what: str) -> None:
    message = str(err.value)
    assert "\n" not in message, message
    assert str(path) in message or str(path.parent) in message and path.name == "manifest.json", message
    assert what in message, message


@pytest.mark.parametrize("damage", CASES, ids=[c.__name__ for c in CASES])
def test_load_into_refuses_a_damaged_checkpoint(pristine, tmp_path, damage):
    root, directory, path = _damaged(pristine, tmp_path, damage)
    ist = _compiled()
    before = _weights(ist)
    with pytest.raises(checkpoint.CheckpointError) as err:
        if damage is missing_manifest:
            checkpoint.Checkpoint(directory)
        else:
            checkpoint.load_into(ist, checkpoint.resumable(root))  # resumable: every file is there
    _assert_one_line_naming(err, path, WHAT[damage])
    after = _weights(ist)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("damage", [c for c in CASES if c is not missing_manifest],
                         ids=[c.__name__ for c in CASES if c is not missing_manifest])
def test_resume_refuses_a_damaged_checkpoint_before_any_work(pristine, tmp_path, damage):
    root, directory, path = _damaged(pristine, tmp_path, damage)
    ist = _compiled()
    before = _weights(ist)
    rows = []
    with pytest.raises(checkpoint.CheckpointError) as err:
        fit(ist, _batches(), rounds=4, local_steps=2, checkpoint_dir=root, checkpoint_every=2, resume=True,
            progress=False, callback=rows.append)
    _assert_one_line_naming(err, path, WHAT[damage])
    assert rows == []
    after = _weights(ist)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_resume_from_the_undamaged_copy_still_works(pristine, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(pristine, root)
    history = fit(_compiled(), _batches(), rounds=3, local_steps=2, checkpoint_dir=root, checkpoint_every=2,
                  resume=True, progress=False)
    assert [row["round"] for row in history] == [2]


def test_the_manifest_lists_every_file_with_its_checksums(pristine):
    manifest = json.loads((checkpoint.round_dir(pristine, 1) / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["model.safetensors", "rank-00000.safetensors"]
    assert sorted(manifest["files"]["model.safetensors"]) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    with checkpoint.TensorFile(checkpoint.round_dir(pristine, 1) / "model.safetensors") as handle:
        import zlib
        value = handle.tensor("fc1.weight")
        assert manifest["files"]["model.safetensors"]["fc1.weight"] == zlib.crc32(value.numpy().tobytes())


@pytest.mark.parametrize("header", [b"[1, 2]", b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}',
                                    b'{"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}',
                                    b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}'])
def test_tensor_file_refuses_bad_headers_before_reading(tmp_path, header):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(checkpoint.CheckpointError, match=f"^{path}: "):
        checkpoint.TensorFile(path)
