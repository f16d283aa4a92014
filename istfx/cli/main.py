"""The ``istfx`` command line: the entry point and the list of commands.

``istfx inspect MODEL.py`` compiles a model file and shows the plan;
``istfx train MODEL.py`` trains it with IST. A command is one entry of
:data:`COMMANDS`: its name, its help, a function that adds its options
(``istfx.cli.options``) and the dotted path of the function that runs it,
imported only when the command runs. Parsing imports no torch, so
``istfx --help``, ``istfx COMMAND --help`` and argument errors answer at
once.

Exit codes: 0 on success, 2 on a usage or model error (the message goes to
stderr, without a traceback), 130 when interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from istfx.cli import export as export_options
from istfx.cli import fl, options
from istfx.errors import ISTError

__all__ = ["COMMANDS", "Command", "build_parser", "main", "report_error", "run_command"]

EXIT_OK = 0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Command:
    """One ``istfx`` subcommand."""

    name: str
    help: str
    description: str
    configure: Callable[[argparse.ArgumentParser], None]  # adds the command's options
    run: str  # "module:function", called with (parsed args, the command's own argv); returns the exit status
    epilog: str = ""
    usage: str | None = None  # argparse's own when None
    check: Callable[[argparse.ArgumentParser, argparse.Namespace], None] | None = None  # after parsing


COMMANDS: list[Command] = [
    Command(
        "inspect",
        help="compile a model file and show what is split and what is shared",
        description="Capture the model defined in MODEL.py, analyse its coupled axes and print\n"
                    "the IST plan: which groups are split across subnets, which are shared and\n"
                    "why, and the parameters each subnet holds.",
        configure=options.configure_inspect,
        run="istfx.cli.inspect:run",
        epilog=options.INSPECT_EPILOG,
        usage="istfx inspect MODEL.py [options]",
    ),
    Command(
        "train",
        help="train a model file with IST (this machine: one process per subnet; or under torchrun)",
        description="Train the model defined in MODEL.py with Independent Subnet Training. By default\n"
                    "one process per subnet starts on this machine (torch.distributed, gloo on\n"
                    "127.0.0.1); under torchrun the same command runs as the ranks of a cluster job.",
        configure=options.configure_train,
        run="istfx.cli.train:run",
        epilog=options.TRAIN_EPILOG,
        usage="istfx train MODEL.py [options]",
        check=options.check_backend_options,
    ),
    Command(
        "fl",
        help="federated IST on Flower: a SuperLink and N SuperNodes on this machine, one subnet per client",
        description="Train the model defined in MODEL.py on a Flower federation started on this machine\n"
                    "(a SuperLink and --clients SuperNodes on 127.0.0.1, Flower's deployment engine):\n"
                    "each round the server sends each sampled client only its subnet, clients train on\n"
                    "their own data partition, the server reassembles and evaluates the full model.",
        configure=fl.configure,
        run="istfx.cli.fl:run",
        epilog=fl.EPILOG,
        usage="istfx fl MODEL.py [options]",
    ),
    Command(
        "export",
        help="write the full model of a checkpoint (sharded ones too) as one safetensors file",
        description="Stream the full model out of an istfx checkpoint (a sharded DCP checkpoint of\n"
                    "--topology sharded, or a ps/local one) into one safetensors file, a block of rows\n"
                    "at a time, every chunk checked; --hf-dir also writes a Hugging Face folder.",
        configure=export_options.configure,
        run="istfx.cli.export:run",
        epilog=export_options.EPILOG,
        usage="istfx export CHECKPOINT --out OUT.safetensors [--model MODEL.py --hf-dir DIR]",
        check=export_options.check,
    ),
]
"""The commands, in the order ``istfx --help`` lists them. Add a command here."""


def _version() -> str:
    from importlib import metadata

    import istfx

    try:
        torch_version = metadata.version("torch")  # read from the metadata: importing torch takes seconds
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    return f"istfx {istfx.__version__} (torch {torch_version})"


def build_parser() -> argparse.ArgumentParser:
    """The ``istfx`` argument parser, every command included."""
    return _parsers()[0]


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``istfx`` parser and each command's own parser."""
    parser = argparse.ArgumentParser(
        prog="istfx",
        description="Independent Subnet Training for any PyTorch model: capture it with "
                    "torch.export, find the axes that can be cut into independent subnets, "
                    "and plan the decomposition.",
        epilog="Run `istfx COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    own = {}
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.description,
                                    usage=command.usage, epilog=command.epilog,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        command.configure(sub)
        own[command.name] = sub
    return parser, own


def report_error(exc: BaseException) -> None:
    """Print a user error as ``istfx: error: ...`` on stderr."""
    print(f"istfx: error: {exc}", file=sys.stderr, flush=True)


def run_command(target: str, args: argparse.Namespace, argv: list[str]) -> int:
    """Import and call the function ``"module:function"`` of a command; user errors become exit status 2."""
    module_name, function = target.split(":")
    try:
        return getattr(importlib.import_module(module_name), function)(args, argv)
    except ISTError as exc:
        report_error(exc)
    except KeyboardInterrupt:
        print("istfx: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``istfx`` command line with `argv` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, own = _parsers()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    command = next(c for c in COMMANDS if c.name == args.command)
    if command.check is not None:
        command.check(own[command.name], args)
    own_argv = argv[argv.index(args.command) + 1:]  # the command's arguments, as given
    return run_command(command.run, args, own_argv)


if __name__ == "__main__":
    raise SystemExit(main())
