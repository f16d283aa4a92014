"""The ``istfx`` command line.

``istfx inspect MODEL.py`` compiles the model defined in a Python file and
shows the plan: which coupled-axis groups are split across subnets, which are
shared and why, and how many parameters each subnet holds. ``--json`` prints
the same as one JSON document (nothing else goes to stdout), ``--graph
out.svg`` draws the captured graph coloured by split group.

A model file is ordinary Python that defines either ``model`` (an
``nn.Module``) or ``build_model()`` (returning one), and optionally
``example_inputs`` (a tensor, a tuple of arguments, a dict of keyword
arguments, or ``(args, kwargs)``). Its folder is on ``sys.path`` while it
loads, so it can import its neighbours. See ``examples/models/``.

Exit codes: 0 on success, 2 on a usage or model error (the message goes to
stderr, without a traceback).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import traceback
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import istfx
from istfx.errors import ISTError
from istfx.core.plan import parse_policy

__all__ = ["CLIError", "load_model_file", "main"]

EXIT_OK = 0
EXIT_ERROR = 2

_MODEL_FILE_HELP = """\
MODEL.py is a Python file that defines:
  model            an nn.Module instance, or
  build_model()    a function with no arguments that returns one;
  example_inputs   (optional) a tensor, a tuple of positional arguments, a dict
                   of keyword arguments, or (args, kwargs). Use a batch of at
                   least 2. When omitted, inputs come from a Hugging Face
                   model's dummy_inputs or from the model's first
                   Linear/Conv/Embedding layer.
The file's folder is on sys.path while it loads."""

_INSPECT_EPILOG = _MODEL_FILE_HELP + """

output:
  Without --json: the plan table (one row per coupled-axis group: units,
  status exact/approximate/frozen, split or shared and why, where its
  units live), ops without an axis rule, and the parameters of each subnet.
  With --json: one JSON document on stdout, the plan (subnets, policy, seed,
  sizes, groups, diagnostics) plus "model", "parameters_full" and
  "parameters_per_subnet". Warnings and progress go to stderr.

examples:
  istfx inspect examples/models/mlp.py
  istfx inspect examples/models/gpt2_tiny.py --subnets 4 --graph gpt2.svg
  istfx inspect examples/models/cnn.py --policy 'overlap(0.5)' --json

exit status: 0 on success, 2 on a usage or model error (message on stderr)."""


class CLIError(Exception):
    """A problem to report in one line on stderr, with exit status 2."""


# -- model files ------------------------------------------------------------------
def load_model_file(path: str | Path) -> tuple[nn.Module, Any]:
    """Run a model file and return ``(model, example_inputs or None)``.

    The file's folder is put first on ``sys.path`` while the file and its
    ``build_model()`` run (and removed afterwards), so a model file can import
    modules next to it.
    """
    model, example_inputs, _ = run_model_file(path)
    return model, example_inputs


def run_model_file(path: str | Path, meta: bool = False) -> tuple[nn.Module, Any, Any]:
    """Run a model file; return ``(model, example_inputs or None, the loaded module)``.

    With `meta`, the file runs under ``torch.device("meta")``: parameters get
    no storage (their values come from a checkpoint or an initial state file).
    """
    path = Path(path)
    if not path.exists():
        raise CLIError(f"model file not found: {path}")
    if not path.is_file():
        raise CLIError(f"not a file: {path}")
    path = path.resolve()
    name = f"istfx_model_{path.stem}_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CLIError(f"cannot load {path} as Python: use a .py file")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.parent)
    sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        with torch.device("meta") if meta else contextlib.nullcontext():
            try:
                spec.loader.exec_module(module)  # stays in sys.modules: the model's classes live there
            except Exception as exc:
                sys.modules.pop(name, None)
                raise CLIError(f"{path.name} failed while loading: {_describe(exc, path)}") from exc
            model, where = _model_of(module, path)
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)
    if not isinstance(model, nn.Module):
        raise CLIError(f"`{where}` in {path.name} is a {type(model).__name__}, not a torch.nn.Module")
    return model, getattr(module, "example_inputs", None), module


def _model_of(module: Any, path: Path) -> tuple[Any, str]:
    """The file's `model`, or what its `build_model()` returns, and which one it was."""
    if hasattr(module, "model"):
        return module.model, "model"
    if callable(getattr(module, "build_model", None)):
        try:
            return module.build_model(), "build_model()"
        except Exception as exc:
            raise CLIError(f"build_model() in {path.name} failed: {_describe(exc, path)}") from exc
    raise CLIError(
        f"{path.name} defines neither `model` nor `build_model()`: add `model = MyModel(...)` "
        "or `def build_model(): return MyModel(...)` (and optionally `example_inputs = ...`)"
    )


def _describe(exc: BaseException, path: Path) -> str:
    """'TypeError: message (at mlp.py:12)': the exception and its last line inside `path`."""
    text = f"{type(exc).__name__}: {exc}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
    if frames:
        text += f" (at {path.name}:{frames[-1].lineno})"
    return text


# -- inspect ----------------------------------------------------------------------------
def _fractions(text: str) -> list[float]:
    try:
        return [float(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions like 0.5,0.25,0.25, got {text!r}") from None


def _add_inspect(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="compile a model file and show what is split and what is shared",
        description="Capture the model defined in MODEL.py, analyse its coupled axes and print\n"
                    "the IST plan: which groups are split across subnets, which are shared and\n"
                    "why, and the parameters each subnet holds.",
        epilog=_INSPECT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL.py", help="Python file defining `model` or `build_model()`")
    p.add_argument("-s", "--subnets", type=int, default=4, metavar="S",
                   help="number of independent subnets per round (default: 4)")
    p.add_argument("--policy", default="disjoint",
                   help="how units are dealt to subnets: 'disjoint' (default), 'overlap(KEEP)' "
                        "e.g. 'overlap(0.5)', or 'rolling'")
    p.add_argument("--sizes", type=_fractions, default=None, metavar="F1,F2,...",
                   help="heterogeneous subnets: one fraction of each split group per subnet, "
                        "e.g. 0.5,0.25,0.25 (default: equal shares)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the per-round assignment (default: 0)")
    p.add_argument("--json", action="store_true",
                   help="print the plan as JSON on stdout (machine-readable; nothing else on stdout)")
    p.add_argument("--graph", metavar="OUT.svg", default=None,
                   help="also write an SVG picture of the captured graph, nodes coloured by split group")
    p.add_argument("--strict", action="store_true",
                   help="fail when an op has no axis rule, instead of keeping its axes whole")
    p.add_argument("--split-inner", action="store_true",
                   help="also split minor factors of viewed axes (e.g. head_dim inside heads x head_dim)")
    depth = p.add_argument_group("depth (ResIST: residual blocks dealt out among subnets)")
    depth.add_argument("--blocks", metavar="GLOB", default=None,
                       help="deal out the residual blocks whose module path matches GLOB, e.g. '*' or "
                            "'layer3.*' (default: no depth pass)")
    depth.add_argument("--min-depth", type=int, default=None, metavar="K",
                       help="each subnet holds at least K blocks (blocks then overlap); needs --blocks")
    depth.add_argument("--no-width", dest="width", action="store_false",
                       help="do not split neurons/channels/heads (depth only; needs --blocks)")
    depth.add_argument("--depth-scaling", choices=("eval", "train", "none"), default="eval",
                       help="scale branch outputs by p at evaluation (eval, default), by 1/p while "
                            "training (train), or not at all (none)")
    depth.add_argument("--shortcut-blocks", choices=("share", "drop"), default="share",
                       help="blocks with a strided/projection shortcut are kept in every subnet "
                            "(share, default) or dealt out keeping their shortcut path (drop)")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    if args.subnets < 1:
        raise CLIError(f"--subnets must be an int >= 1, got {args.subnets}")
    try:
        policy = parse_policy(args.policy)
    except ValueError as exc:
        hint = "" if "unknown policy" in str(exc) else (
            "; use 'disjoint', 'overlap(KEEP)' with 0 < KEEP <= 1, or 'rolling'")
        raise CLIError(f"--policy {args.policy!r}: {exc}{hint}") from None
    graph_path = Path(args.graph) if args.graph else None
    if graph_path is not None and graph_path.parent and not graph_path.parent.is_dir():
        raise CLIError(f"--graph: folder {graph_path.parent} does not exist")

    # Anything the model file or the compiler prints goes to stderr: stdout is the report.
    with contextlib.redirect_stdout(sys.stderr):
        model, example_inputs = load_model_file(args.model)
        ist = istfx.compile(
            model, args.subnets, example_inputs=example_inputs, policy=policy, sizes=args.sizes,
            seed=args.seed, strict=args.strict, split_inner=args.split_inner,
            blocks=args.blocks, min_depth=args.min_depth, width=args.width,
            depth_scaling=args.depth_scaling, shortcut_blocks=args.shortcut_blocks,
        )
        if graph_path is not None:
            from istfx.draw.graphview import plan_graph_svg

            graph_path.write_text(plan_graph_svg(ist), encoding="utf-8")
            print(f"istfx: wrote the graph to {graph_path}", file=sys.stderr)

    plan = ist.plan
    if args.json:
        report = plan.to_dict()
        report["model"] = type(model).__name__
        report["parameters_full"] = plan.parameters_full
        report["parameters_per_subnet"] = list(plan.parameters_per_subnet)
        print(json.dumps(report, indent=2))
    else:
        print(f"model: {type(model).__name__} ({args.model})")
        print(plan)
        print()
        print(_parameter_table(plan))
    return EXIT_OK


def _parameter_table(plan) -> str:
    full = plan.parameters_full
    lines = [f"{'subnet':>6}  {'parameters':>12}  {'of full':>8}"]
    for s, count in enumerate(plan.parameters_per_subnet):
        lines.append(f"{s:>6}  {count:>12,}  {count / max(full, 1):>8.1%}")
    lines.append(f"{'full':>6}  {full:>12,}  {1:>8.1%}")
    return "\n".join(lines)


# -- entry point -------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="istfx",
        description="Independent Subnet Training for any PyTorch model: capture it with "
                    "torch.export, find the axes that can be cut into independent subnets, "
                    "and plan the decomposition.",
        epilog="Run `istfx COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version",
                        version=f"istfx {istfx.__version__} (torch {torch.__version__})")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_inspect(subparsers)
    from istfx.cli.train import add_parser as _add_train

    _add_train(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``istfx`` command line with `argv` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"istfx: error: {exc}", file=sys.stderr)
    except ISTError as exc:
        print(f"istfx: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("istfx: interrupted", file=sys.stderr)
        return 130
    return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
