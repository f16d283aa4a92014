"""``istfx export`` / :func:`istfx.runtime.export.export` on ps/local ("full") checkpoints, in one process.

Sharded (DCP) checkpoints are exported in tests/test_dcp.py, which needs ranks to write them. Here: the
output equals the checkpoint's model and carries checksums, it is streamed in blocks of rows, a corrupt
checkpoint leaves no output and one line naming the file, and ``--hf-dir`` writes a Hugging Face folder
that ``from_pretrained`` loads back.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

from istfx.cli.main import main as istfx_main
from istfx.runtime import checkpoint, dcp_checkpoint
from istfx.runtime.export import export


def _full_checkpoint(root: Path, state: dict[str, torch.Tensor], round: int = 2) -> Path:
    directory = checkpoint.round_dir(root, round)
    checkpoint.atomic_save(state, checkpoint.model_file(directory), {"round": round})
    checkpoint.save_rank(directory, 0, {"data_positions": {}})
    checkpoint.write_manifest(root, round, {"format": checkpoint.FULL, "world_size": 1})
    return directory


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"a.weight": torch.randn(300, 70), "a.bias": torch.randn(300), "steps": torch.tensor(5),
            "half": torch.randn(17, 3).to(torch.bfloat16)}


def test_export_streams_a_full_checkpoint_into_an_equal_checked_file(tmp_path, monkeypatch):
    state = _state()
    _full_checkpoint(tmp_path / "ckpt", state)
    monkeypatch.setattr(dcp_checkpoint, "_BLOCK_BYTES", 1000)  # many blocks per tensor
    blocks = []
    stream = dcp_checkpoint.stream_chunk

    def counting(path, key, chunk):
        for block in stream(path, key, chunk):
            blocks.append(block.numel() * block.element_size())
            yield block

    monkeypatch.setattr(dcp_checkpoint, "stream_chunk", counting)
    out = export(tmp_path / "ckpt", tmp_path / "model.safetensors")
    assert max(blocks) <= 1000 and len(blocks) > 2 * 30  # never a whole 300 x 70 tensor at once
    with checkpoint.TensorFile(out) as handle:  # its own CRC table, checked on every read
        assert set(handle.checksums) == set(state)
        loaded, meta = handle.load_all()
    assert meta["round"] == 2
    for name, value in state.items():
        assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value), name


def test_a_corrupt_checkpoint_leaves_no_output_and_names_the_file(tmp_path, capsys):
    directory = _full_checkpoint(tmp_path / "ckpt", _state())
    path = checkpoint.model_file(directory)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    out = tmp_path / "model.safetensors"
    assert istfx_main(["export", str(tmp_path / "ckpt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and ("checksum" in err[0] or "differ" in err[0])
    assert not out.exists() and not list(tmp_path.glob(".model.safetensors.*"))
    assert istfx_main(["export", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_hf_dir_needs_model():
    proc = subprocess.run([sys.executable, "-m", "istfx.cli", "export", "ckpt", "--out", "m.safetensors",
                           "--hf-dir", "hf"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--hf-dir needs --model" in proc.stderr


HF_MODEL = '''
import torch
import transformers as tf


def build_model():
    torch.manual_seed(1)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))


example_inputs = (torch.randint(0, 64, (2, 8)),)
'''


def test_hf_dir_writes_a_folder_from_pretrained_loads(tmp_path):
    (tmp_path / "llama.py").write_text(HF_MODEL, encoding="utf-8")
    torch.manual_seed(1)
    trained = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.25)  # not the model file's initial weights
    state = {k: v.clone() for k, v in trained.state_dict().items() if k != "lm_head.weight" or
             v.data_ptr() != trained.state_dict()["model.embed_tokens.weight"].data_ptr()}
    _full_checkpoint(tmp_path / "ckpt", state)
    code = istfx_main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "m.safetensors"),
                       "--model", str(tmp_path / "llama.py"), "--hf-dir", str(tmp_path / "hf")])
    assert code == 0
    again = tf.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    for name, value in trained.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name


@pytest.mark.parametrize("rows,world", [(10, 4), (10, 8), (0, 3), (7, 1)])
def test_canonical_rows_tile_the_tensor(rows, world):
    ranges = [dcp_checkpoint.row_range(rows, world, r) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(stop >= start for start, stop in ranges)
    assert ranges == [tuple(min(rows, x) for x in (r * -(-rows // world), (r + 1) * -(-rows // world)))
                      for r in range(world)] if rows else all(r == (0, 0) for r in ranges)
