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
        (["--policy", "random"], "unknown policy"),
        (["--policy", "overlap(2)"], "overlap policy"),
        (["--sizes", "0.5,0.5"], "sizes must give 4 fractions"),
        (["--min-depth", "2"], "min_depth needs the depth pass"),
        (["--blocks", "nope.*"], "no residual block"),
    ],
)
def test_bad_options_are_the_librarys_errors(capsys, argv, message):
    code, out, err = _inspect(capsys, str(EXAMPLES / "mlp.py"), *argv)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [(["--subnets", "0"], "--subnets: must be >= 1"),
                                           (["--sizes", "a,b"], "expected comma-separated fractions")])
def test_malformed_values_stop_at_parsing(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["inspect", str(EXAMPLES / "mlp.py"), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


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
    import transformers  # noqa: F401  (the test extra; the example builds a HF model)

    target = tmp_path / "gpt2.svg"
    code, out, _ = _inspect(capsys, str(EXAMPLES / "gpt2_tiny.py"), "--json", "--graph", str(target))
    assert code == 0
    split = [g for g in json.loads(out)["groups"] if g["split"]]
    assert sorted(g["units"] for g in split) == [4, 4, 256, 256]  # heads and FFN units of 2 layers
    fills = _node_fills(target.read_text(encoding="utf-8"))
    assert len(set(fills)) == len(split) + 1  # one colour per split group, grey for the rest


def test_inspect_gcn(capsys):
    import torch_geometric  # noqa: F401  (the test extra; the example builds a PyG model)

    code, out, _ = _inspect(capsys, str(EXAMPLES / "gcn.py"), "--json")
    assert code == 0
    report = json.loads(out)
    split = [g for g in report["groups"] if g["split"]]
    assert [g["units"] for g in split] == [64]  # the hidden features
    assert not any(m["tensor"] == "convs.1.bias" for g in split for m in g["members"])  # output bias shared


# -- inspect: nothing to split, roles, approximate groups ------------------------------------------
LINEAR_ONLY = "import torch\nfrom torch import nn\n\nmodel = nn.Linear(8, 3)\nexample_inputs = torch.randn(4, 8)\n"

LAYERNORM_MLP = """
import torch
from torch import nn

model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
example_inputs = torch.randn(4, 8)
"""


def test_inspect_prints_the_plan_when_nothing_splits(capsys, tmp_path):
    path = tmp_path / "linear.py"
    path.write_text(LINEAR_ONLY)
    code, out, err = _inspect(capsys, str(path), "--subnets", "2")
    assert code == 0, err
    assert "IST plan: 2 subnets" in out and "shared" in out and "split" not in out.split("members", 1)[1]
    assert "nothing in Linear can be split" in err and "Traceback" not in err
    code, out, err = _inspect(capsys, str(path), "--json")
    report = json.loads(out)
    assert code == 0 and report["split_any"] is False and not any(g["split"] for g in report["groups"])
    assert report["parameters_per_subnet"] == [report["parameters_full"]] * 4


def test_inspect_too_many_subnets_shows_why(capsys):
    code, out, err = _inspect(capsys, str(EXAMPLES / "mlp.py"), "--subnets", "1000")
    assert code == 0
    assert "use subnets <= 256" in err
    assert "1000 subnets" in out and "more, " in out  # the per-subnet table is cut short


def test_inspect_json_has_a_role_per_group(capsys):
    import torch
    from istfx.models import SmallCNN
    from istfx.passes import roles

    code, out, _ = _inspect(capsys, str(EXAMPLES / "cnn.py"), "--json")
    assert code == 0
    groups = json.loads(out)["groups"]
    assert all(isinstance(g["role"], str) and g["role"] for g in groups)
    expected = roles(istfx.compile(SmallCNN(), 4, example_inputs=torch.randn(8, 1, 8, 8)))
    assert {g["id"]: g["role"] for g in groups} == expected


def test_split_approximate_reaches_the_compiler(capsys, tmp_path):
    path = tmp_path / "ln.py"
    path.write_text(LAYERNORM_MLP)
    _, out, _ = _inspect(capsys, str(path), "--json", "--subnets", "2")
    approximate = [g for g in json.loads(out)["groups"] if g["status"] == "approximate"]
    assert approximate and not any(g["split"] for g in approximate)
    _, out, _ = _inspect(capsys, str(path), "--json", "--subnets", "2", "--split-approximate")
    assert any(g["split"] for g in json.loads(out)["groups"] if g["status"] == "approximate")


# -- one set of compile options, passed through unchanged ----------------------------------------------
def test_compile_options_are_the_compilers():
    import inspect as pyinspect

    from istfx.cli.options import compile_kwargs
    from istfx.cli.train import build_parser

    args = build_parser().parse_args(["m.py"])
    kwargs = compile_kwargs(args)
    parameters = pyinspect.signature(istfx.compile).parameters
    assert set(kwargs) == set(parameters) - {"model", "example_inputs"}
    for name, value in kwargs.items():  # the CLI's defaults are the library's
        if parameters[name].default is not pyinspect.Parameter.empty:
            assert value == parameters[name].default, name


# A value other than the default for every option of `istfx train`.
EVERY_TRAIN_FLAG = [
    "--subnets", "3", "--policy", "overlap(0.5)", "--sizes", "0.5,0.3,0.2", "--seed", "7", "--strict",
    "--split-inner", "--split-approximate", "--dynamic", "batch", "--blocks", "layers.*", "--min-depth", "2", "--no-width",
    "--depth-scaling", "train", "--shortcut-blocks", "drop", "--group-blocks", "layers.*", "--backend", "torch",
    "--rounds", "11", "--local-steps", "4", "--data", "digits", "--lr", "0.05", "--momentum", "0.5",
    "--optimizer", "adamw", "--weight-decay", "0.1", "--betas", "0.9,0.95", "--warmup-steps", "5",
    "--lr-schedule", "cosine", "--clip-grad-norm", "1.0", "--optimizer-state", "carry", "--outer-lr", "0.7",
    "--outer-momentum", "0.9",
    "--batch-size", "16", "--no-shard", "--eval-every", "3", "--threads", "2", "--quiet",
    "--checkpoint-dir", "ck", "--checkpoint-every", "2", "--keep-checkpoints", "3", "--resume", "--resume-if-present",
    "--metrics", "m.jsonl", "--save", "out.safetensors", "--master-port", "29999", "--timeout", "60",
    "--topology", "sharded", "--compress", "int8", "--round-timeout", "30", "--heartbeat-timeout", "0",
    "--local-rank", "1",
]
DEEPSPEED_FLAGS = ["--data-parallel", "2", "--zero-stage", "2", "--grad-accum", "3", "--precision", "bf16"]


@pytest.mark.parametrize("backend_flags", [[], ["--backend", "deepspeed", *DEEPSPEED_FLAGS]])
def test_every_train_flag_reaches_the_ranks(backend_flags):
    from istfx.cli.main import build_parser as istfx_parser
    from istfx.cli.train import build_parser, worker_argv

    argv = ["model.py", *EVERY_TRAIN_FLAG, *backend_flags]
    parent = istfx_parser().parse_args(["train", *argv])
    rank_parser = build_parser()
    defaults = rank_parser.parse_args(["model.py"])
    rank = rank_parser.parse_args(worker_argv(argv, parent, "/tmp/init.safetensors"))
    assert rank.init_from == "/tmp/init.safetensors"  # the one thing the launcher adds
    given = {k: v for k, v in vars(rank).items() if k != "init_from"}
    assert given == {k: v for k, v in vars(parent).items() if k in given}
    # Every option of the command is set to a non-default value by one of the two cases: a new
    # option must be added to this test, and then it reaches the ranks too.
    deepspeed_only = {"backend", "data_parallel", "zero_stage", "grad_accum", "precision"}
    changed = {k for k in vars(defaults) if getattr(parent, k) != getattr(defaults, k)}
    if backend_flags:
        assert deepspeed_only <= changed
    else:
        assert set(vars(defaults)) - changed == deepspeed_only | {"init_from", "model"}
    # A user's own --init-from is passed as given, never replaced.
    mine = istfx_parser().parse_args(["train", *argv, "--init-from", "mine.safetensors"])
    assert worker_argv([*argv, "--init-from", "mine.safetensors"], mine, "/tmp/x")[-2:] == \
        ["--init-from", "mine.safetensors"]


def test_backend_options_belong_to_their_backend(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", str(EXAMPLES / "mlp.py"), "--zero-stage", "2"])
    assert exc.value.code == 2
    assert "--zero-stage is an option of --backend deepspeed, not of --backend torch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", str(EXAMPLES / "mlp.py"), "--backend", "local", "--topology", "sharded"])
    assert "--topology is an option of --backend torch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", str(EXAMPLES / "mlp.py"), "--nproc", "4"])  # the ranks follow from the subnets
    assert "unrecognized arguments: --nproc" in capsys.readouterr().err


# -- start-up: no torch for help and argument errors ------------------------------------------------------
def test_help_and_argument_errors_do_not_import_torch():
    code = (
        "import sys\n"
        "from istfx.cli import main\n"
        "for argv in (['--help'], ['--version'], ['inspect', '--help'], ['train', '--help'],\n"
        "             ['train', 'm.py', '--rounds', '0'], ['train', 'm.py', '--zero-stage', '2'], ['nope']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO TORCH', file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stderr.strip().endswith("NO TORCH"), proc.stderr[-2000:]
    assert "--split-approximate" in proc.stdout and "--min-depth" in proc.stdout  # both commands' help
    assert "--rounds: must be >= 1" in proc.stderr


# -- start-up progress of the launcher -------------------------------------------------------------------
def test_monitor_reports_each_milestone_and_names_a_late_rank(tmp_path, monkeypatch):
    import io

    from istfx.cli import progress

    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    monitor = progress.StartupMonitor(str(tmp_path), 3, str(tmp_path / "ready"), stream=out)
    monitor.begin()
    status = [progress.RankStatus(str(tmp_path), r) for r in range(3)]
    for s in status:
        s.set("importing")
    clock[0] += 4.0
    for s in status:
        s.set("capturing")
    monitor.poll([None] * 3)
    status[0].set("loading data")
    status[1].set("loading data")
    clock[0] += 1.0
    monitor.poll([None] * 3)  # rank 2 is behind, but only just
    clock[0] += 6.0
    monitor.poll([None] * 3)
    monitor.poll([None] * 3)  # said once, not at every poll
    (tmp_path / "ready").touch()
    clock[0] += 2.0
    monitor.poll([None] * 3)
    lines = out.getvalue().splitlines()
    assert lines == [
        "starting 3 ranks...",
        "3 ranks up (python, torch) in 4.0s; capturing the model...",
        "  waiting for rank 2 (capturing the model, 7.0s)...",
        "model captured in 9.0s; loading data...",
        "data loaded in 0.0s; joining...",
        "3 ranks joined in 0.0s; training",
    ]
    status[1].set("capturing")
    assert monitor.failure(1, 1) == "rank 1 exited with status 1"  # after start-up: no phase to name


def test_rank_errors_are_printed_once(tmp_path, capsys):
    from istfx.cli import progress

    monitor = progress.StartupMonitor(str(tmp_path), 3, None, enabled=False)
    for rank in range(3):
        progress.RankStatus(str(tmp_path), rank).error("nothing in Linear can be split")
    assert monitor.failure(0, 2) == ""  # the error itself says it
    assert monitor.report_errors()
    assert capsys.readouterr().err == "istfx: error: nothing in Linear can be split\n"


def test_a_rank_that_fails_to_start_is_named(tmp_path, capsys):
    from istfx.cli.progress import StartupMonitor
    from istfx.runtime.launch import launch

    monitor = StartupMonitor(str(tmp_path), 2, str(tmp_path / "ready"), enabled=False)
    code = launch([], 2, module="istfx_no_such_module", status_dir=str(tmp_path), monitor=monitor, grace=2.0)
    assert code == 1
    err = capsys.readouterr().err
    assert "rank 0 failed while starting python (exit status 1)" in err or \
        "rank 1 failed while starting python (exit status 1)" in err


def test_train_reports_progress_and_a_rank_error_once(tmp_path):
    """Two real ranks; both stop on the same user error, which is printed once and without a traceback."""
    path = tmp_path / "linear.py"
    path.write_text(LINEAR_ONLY)
    script = Path(sys.executable).parent / "istfx"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "istfx.cli"]
    proc = subprocess.run([*cmd, "train", str(path), "--subnets", "2", "--threads", "1"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert err.startswith("istfx train ") and "2 subnets on 2 ranks" in err
    assert "loading model..." in err and "starting 2 ranks..." in err
    assert "2 ranks up (python, torch) in " in err
    assert err.count("nothing in Linear can be split") == 1 and "Traceback" not in err


def test_local_train_runs_the_depth_options(tmp_path, capsys):
    from istfx.cli.train import main as train_main

    path = tmp_path / "res.py"
    path.write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Block(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(64, 64)\n"
        "    def forward(self, x):\n"
        "        return x + self.fc(torch.relu(x))\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.layers = nn.Sequential(*[Block() for _ in range(4)])\n"
        "        self.head = nn.Linear(64, 10)\n"
        "    def forward(self, x):\n"
        "        return self.head(self.layers(x))\n\n"
        "model = Net()\nexample_inputs = torch.randn(4, 64)\n"
    )
    metrics = tmp_path / "m.jsonl"
    code = train_main([str(path), "--backend", "local", "--subnets", "2", "--blocks", "layers.*", "--no-width",
                       "--min-depth", "2", "--rounds", "2", "--local-steps", "2", "--threads", "1",
                       "--metrics", str(metrics)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "capturing model..." in err and "round    2/2" in out
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    full = 4 * (64 * 64 + 64) + 64 * 10 + 10
    # depth only, two of four blocks per subnet: each subnet holds the head and two blocks
    assert rows[0]["parameters_per_subnet"] == [full - 2 * (64 * 64 + 64)] * 2


def test_nothing_to_split_error_carries_the_plan():
    import torch
    from torch import nn

    with pytest.raises(istfx.NothingToSplitError, match="nothing in Linear can be split") as info:
        istfx.compile(nn.Linear(6, 3), subnets=2, example_inputs=(torch.randn(4, 6),))
    plan = info.value.plan
    assert isinstance(info.value, istfx.ISTError) and plan.split == [] and plan.groups
    assert plan.parameters_per_subnet == [plan.parameters_full] * 2 == [21, 21]


def test_different_rank_errors_name_their_ranks(tmp_path, capsys):
    from istfx.cli import progress

    monitor = progress.StartupMonitor(str(tmp_path), 3, None, enabled=False)
    progress.RankStatus(str(tmp_path), 0).error("cannot go on")
    progress.RankStatus(str(tmp_path), 2).error("timed out")
    progress.RankStatus(str(tmp_path), 1).set("joining")
    assert monitor.report_errors()
    assert capsys.readouterr().err == "istfx: error (rank 0): cannot go on\nistfx: error (rank 2): timed out\n"
