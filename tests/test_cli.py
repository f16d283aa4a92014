"""The ``istfx`` command line: ``istfx inspect`` on the example model files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import istfx
from istfx.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "models"
SVG = "{http://www.w3.org/2000/svg}"


def _inspect(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["inspect", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _node_fills(svg_text: str) -> list[str]:
    root = ET.fromstring(svg_text.encode("utf-8"))
    return [g.find(f"{SVG}rect").get("fill") for g in root.iter(f"{SVG}g") if g.get("class") == "node"]


def _legend_fills(svg_text: str) -> dict[str, str]:
    """Legend line text -> swatch colour."""
    root = ET.fromstring(svg_text.encode("utf-8"))
    legend = next(g for g in root.iter(f"{SVG}g") if g.get("class") == "legend")
    swatches = [r.get("fill") for r in legend.findall(f"{SVG}rect")][1:]  # first rect is the box
    texts = [t.text for t in legend.findall(f"{SVG}text")]
    return dict(zip(texts, swatches))


@pytest.mark.parametrize("name", ["mlp.py", "cnn.py"])
def test_inspect_text(capsys, name):
    code, out, _ = _inspect(capsys, str(EXAMPLES / name), "--subnets", "4")
    assert code == 0
    assert "split" in out
    assert "IST plan: 4 subnets" in out
    for s in range(4):
        assert any(line.split()[:1] == [str(s)] for line in out.splitlines()), f"no row for subnet {s}"


@pytest.mark.parametrize("name", ["mlp.py", "cnn.py"])
def test_inspect_json(capsys, name):
    code, out, _ = _inspect(capsys, str(EXAMPLES / name), "--subnets", "3", "--json", "--seed", "5")
    assert code == 0
    report = json.loads(out)  # stdout holds nothing but the document
    assert report["subnets"] == 3 and report["seed"] == 5 and report["policy"] == "disjoint"
    split = [g for g in report["groups"] if g["split"]]
    assert split and all(g["status"] == "exact" for g in split)
    assert all(sum(g["units_per_subnet"]) == g["units"] for g in split)
    per = report["parameters_per_subnet"]
    assert len(per) == 3 and all(0 < p < report["parameters_full"] for p in per)


def test_inspect_json_overlap_policy(capsys):
    code, out, _ = _inspect(capsys, str(EXAMPLES / "mlp.py"), "--json", "--subnets", "2", "--policy", "overlap(0.75)")
    assert code == 0
    report = json.loads(out)
    assert report["policy"] == "overlap(0.75)"
    assert all(g["units_per_subnet"] == [192, 192] for g in report["groups"] if g["split"])


@pytest.mark.parametrize("name", ["mlp.py", "cnn.py"])
def test_inspect_graph(capsys, tmp_path, name):
    target = tmp_path / "plan.svg"
    code, out, err = _inspect(capsys, str(EXAMPLES / name), "--json", "--graph", str(target))
    assert code == 0
    split_ids = [g["id"] for g in json.loads(out)["groups"] if g["split"]]
    assert str(target) in err
    text = target.read_text(encoding="utf-8")
    fills = _node_fills(text)
    legend = _legend_fills(text)
    for gid in split_ids:
        line = next(t for t in legend if t.startswith(f"g{gid}: split "))
        assert fills.count(legend[line]) >= 1, f"no node coloured for g{gid}"
    assert len(legend) == len(split_ids)


def test_graph_colours_follow_the_split_axis():
    import torch
    from istfx.models import ISTMLP

    from istfx.draw.graphview import node_split_groups

    ist = istfx.compile(ISTMLP(16, [32, 24], 5), 4, example_inputs=torch.randn(4, 16))
    first, second = ist.plan.split
    groups = node_split_groups(ist)
    assert groups["linear"] == groups["batch_norm"] == groups["relu"] == first
    assert groups["linear_1"] == second
    assert groups["x"] is None and groups["linear_2"] is None  # input and logits are shared
    assert groups["layers_3_weight"] == first  # [24, 32]: its last axis, dim 1, is cut with the first layer
    assert groups["layers_4_weight"] == second  # BatchNorm scale of the second layer: [24]
    assert "_guards_fn" not in groups


def test_missing_file(capsys, tmp_path):
    code, out, err = _inspect(capsys, str(tmp_path / "nope.py"))
    assert code == 2 and out == ""
    assert "not found" in err and "nope.py" in err and "Traceback" not in err


def test_file_without_model(capsys, tmp_path):
    path = tmp_path / "empty.py"
    path.write_text("import torch\nx = 1\n")
    code, _, err = _inspect(capsys, str(path))
    assert code == 2
    assert "neither `model` nor `build_model()`" in err and "Traceback" not in err


def test_model_not_a_module(capsys, tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("model = 3\n")
    code, _, err = _inspect(capsys, str(path))
    assert code == 2 and "not a torch.nn.Module" in err


def test_model_file_that_raises(capsys, tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import torch\n\nraise RuntimeError('boom')\n")
    code, _, err = _inspect(capsys, str(path))
    assert code == 2 and "RuntimeError: boom" in err and "broken.py:3" in err and "Traceback" not in err


def test_build_model_and_neighbour_import(capsys, tmp_path):
    (tmp_path / "layers_here.py").write_text("from torch import nn\nWIDTH = 32\n")
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\nfrom layers_here import WIDTH\n\n"
        "def build_model():\n"
        "    return nn.Sequential(nn.Linear(8, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 3))\n\n"
        "example_inputs = torch.randn(4, 8)\n"
        "print('noise from the model file')\n"
    )
    code, out, err = _inspect(capsys, str(tmp_path / "net.py"), "--json", "--subnets", "2")
    assert code == 0
    report = json.loads(out)
    assert report["model"] == "Sequential"
    assert [g["units"] for g in report["groups"] if g["split"]] == [32]
    assert "noise from the model file" in err
    assert str(tmp_path) not in sys.path


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--subnets", "0"], "--subnets must be an int >= 1"),
        (["--subnets", "1000"], "use subnets <="),
        (["--policy", "random"], "unknown policy"),
    ],
)
def test_bad_options(capsys, argv, message):
    code, out, err = _inspect(capsys, str(EXAMPLES / "mlp.py"), *argv)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "inspect" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert istfx.__version__ in capsys.readouterr().out


def test_console_script_help():
    # The script installed beside this interpreter (a venv's bin/), not whatever `istfx` PATH finds first.
    script = Path(sys.executable).parent / ("istfx.exe" if os.name == "nt" else "istfx")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "istfx.cli"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    top = subprocess.run([*cmd, "--help"], check=False, capture_output=True, text=True, timeout=120, env=env)
    assert top.returncode == 0, top.stderr
    assert "inspect" in top.stdout and "--version" in top.stdout
    sub = subprocess.run([*cmd, "inspect", "--help"], check=False, capture_output=True, text=True, timeout=120, env=env)
    assert sub.returncode == 0, sub.stderr
    for option in ("--subnets", "--policy", "--seed", "--json", "--graph", "--strict", "--split-inner",
                   "build_model", "example_inputs"):
        assert option in sub.stdout


def test_inspect_gpt2_tiny(capsys, tmp_path):
    pytest.importorskip("transformers")
    target = tmp_path / "gpt2.svg"
    code, out, _ = _inspect(capsys, str(EXAMPLES / "gpt2_tiny.py"), "--json", "--graph", str(target))
    assert code == 0
    split = [g for g in json.loads(out)["groups"] if g["split"]]
    assert sorted(g["units"] for g in split) == [4, 4, 256, 256]  # heads and FFN units of 2 layers
    fills = _node_fills(target.read_text(encoding="utf-8"))
    assert len(set(fills)) == len(split) + 1  # one colour per split group, grey for the rest


def test_inspect_gcn(capsys):
    pytest.importorskip("torch_geometric")
    code, out, _ = _inspect(capsys, str(EXAMPLES / "gcn.py"), "--json")
    assert code == 0
    report = json.loads(out)
    split = [g for g in report["groups"] if g["split"]]
    assert [g["units"] for g in split] == [64]  # the hidden features
    assert not any(m["tensor"] == "convs.1.bias" for g in split for m in g["members"])  # output bias shared
