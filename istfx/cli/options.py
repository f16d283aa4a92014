"""The ``istfx`` command-line options, defined once.

:func:`add_compile_options` declares the options of ``istfx.compile``
(subnets, policy, sizes, seed, depth, ...) for every command that compiles a
model (``inspect``, ``train``), and :func:`compile_kwargs` turns them back
into ``istfx.compile`` keyword arguments. Nothing here imports torch:
``istfx --help`` and argument errors answer at once. Values are only parsed
here (an int is an int); whether they make sense together is the library's
to say when it runs.
"""
from __future__ import annotations

import argparse
from typing import Any

from istfx.cli.loader import MODEL_FILE_HELP

__all__ = ["BACKEND_OPTIONS", "add_compile_options", "add_optimizer_options", "betas", "check_backend_options",
           "compile_kwargs", "configure_inspect", "configure_train", "fractions", "int_at_least", "non_negative_int",
           "number", "positive_int"]


def int_at_least(minimum: int):
    """An argparse type: an int ``>= minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def number(*, minimum: float | None = None, above: float | None = None):
    """An argparse type: a finite float ``>= minimum`` (``> above``); nan, inf and out-of-range values
    are refused by :func:`istfx.runtime.numbers.finite` before anything runs."""
    from istfx.errors import ISTError
    from istfx.runtime.numbers import finite

    def parse(text: str) -> float:
        try:
            return finite("the value", text, minimum=minimum, above=above)
        except ISTError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("the value ")) from None

    parse.__name__ = "number"  # argparse names the type in its messages
    return parse


def fractions(text: str) -> list[float]:
    """An argparse type: comma-separated fractions, ``0.5,0.25,0.25``."""
    try:
        return [float(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated fractions like 0.5,0.25,0.25, got {text!r}") from None


# -- compile options (inspect and train) ---------------------------------------------------
_COMPILE_DESTS = ("subnets", "policy", "sizes", "seed", "strict", "split_inner", "split_approximate",
                  "blocks", "min_depth", "width", "depth_scaling", "shortcut_blocks", "group_blocks", "dynamic")


def add_compile_options(p: argparse.ArgumentParser) -> None:
    """The options of ``istfx.compile``, with its defaults."""
    p.add_argument("model", metavar="MODEL.py", help="Python file defining `model` or `build_model()`")
    g = p.add_argument_group("compile (what is split, and how units are dealt out)")
    g.add_argument("-s", "--subnets", type=positive_int, default=4, metavar="S",
                   help="independent subnets per round (default: 4)")
    g.add_argument("--policy", default="disjoint",
                   help="how units are dealt to subnets: 'disjoint' (default), 'overlap(KEEP)' "
                        "e.g. 'overlap(0.5)', 'rolling', or 'nested' (prefixes of --sizes, HeteroFL)")
    g.add_argument("--sizes", type=fractions, default=None, metavar="F1,F2,...",
                   help="heterogeneous subnets: one fraction of each split group per subnet, "
                        "e.g. 0.5,0.25,0.25 (default: equal shares)")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the per-round assignment (train: the weights and data shards too; default: 0)")
    g.add_argument("--strict", action="store_true",
                   help="fail when an op has no axis rule, instead of keeping its axes whole")
    g.add_argument("--split-inner", action="store_true",
                   help="also split minor factors of viewed axes (e.g. head_dim inside heads x head_dim)")
    g.add_argument("--split-approximate", action="store_true",
                   help="also split approximate groups (e.g. d_model under LayerNorm): valid narrower "
                        "subnets, not mask-equivalent")
    g.add_argument("--dynamic", choices=("auto", "all", "batch", "static"), default="auto",
                   help="input dims subnets accept at any size: auto (batch and every dim the model accepts at "
                        "another size, image sides static; default), all, batch (dim 0 only), static")
    depth = p.add_argument_group("depth (ResIST: residual blocks dealt out among subnets)")
    depth.add_argument("--blocks", metavar="GLOB", default=None,
                       help="deal out the residual blocks whose module path matches GLOB, e.g. '*' or "
                            "'layer3.*' (default: no depth pass)")
    depth.add_argument("--min-depth", type=positive_int, default=None, metavar="K",
                       help="each subnet holds at least K blocks (blocks then overlap); needs --blocks")
    depth.add_argument("--no-width", dest="width", action="store_false",
                       help="do not split neurons/channels/heads (depth only; needs --blocks)")
    depth.add_argument("--depth-scaling", choices=("eval", "train", "none"), default="eval",
                       help="scale branch outputs by p at evaluation (eval, default), by 1/p while "
                            "training (train), or not at all (none)")
    depth.add_argument("--shortcut-blocks", choices=("share", "drop"), default="share",
                       help="blocks with a strided/projection shortcut are kept in every subnet "
                            "(share, default) or dealt out keeping their shortcut path (drop)")
    depth.add_argument("--group-blocks", metavar="GLOB", default=None,
                       help="modules whose residual branches are dropped together, e.g. 'model.layers.*' "
                            "(default: one unit per branch-holding module)")


def compile_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``istfx.compile`` keyword arguments (``subnets`` included) from parsed options."""
    return {dest: getattr(args, dest) for dest in _COMPILE_DESTS}


# -- inspect ----------------------------------------------------------------------------------
INSPECT_EPILOG = MODEL_FILE_HELP + """

output:
  Without --json: the plan table (one row per coupled-axis group: units,
  status exact/approximate/frozen, role, split or shared and why), ops
  without an axis rule, and the parameters of each subnet. When nothing can
  be split, the table still prints (it says why) and a note goes to stderr.
  With --json: one JSON document on stdout, the plan (subnets, policy, seed,
  sizes, groups with their role, diagnostics) plus "model", "split_any",
  "parameters_full" and "parameters_per_subnet". Warnings and progress go
  to stderr.

examples:
  istfx inspect examples/models/mlp.py
  istfx inspect examples/models/gpt2_tiny.py --subnets 4 --graph gpt2.svg
  istfx inspect examples/models/cnn.py --policy 'overlap(0.5)' --json

exit status: 0 on success, 2 on a usage or model error (message on stderr)."""


def configure_inspect(p: argparse.ArgumentParser) -> None:
    """The options of ``istfx inspect``."""
    add_compile_options(p)
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true",
                     help="print the plan as JSON on stdout (machine-readable; nothing else on stdout)")
    out.add_argument("--graph", metavar="OUT.svg", default=None,
                     help="also write an SVG picture of the captured graph, nodes coloured by split group")


# -- train --------------------------------------------------------------------------------------
TRAIN_EPILOG = """\
MODEL.py defines `model` (an nn.Module) or `build_model()`, optionally
`example_inputs`, `train_data()` and `eval_data()` (datasets of (input, label)
pairs or pairs of tensors (X, Y); default: scikit-learn's digits) and
`loss_fn` (default: cross entropy); or, for batches that are not dataset
rows (graphs), `train_batches(subnet, subnets, seed)` and `eval_batches()`
returning iterables of (inputs, targets) batches.

ranks: --backend torch runs one rank per subnet, --backend deepspeed
subnets x --data-parallel ranks. On this machine `istfx train` starts them
itself and says what they are doing until the first round (importing torch,
capturing the model, loading data, joining), with the time each phase took;
each rank receives this command's arguments unchanged. Round lines go to stdout, start-up progress and errors to stderr.

on a cluster (the same ranks under torchrun, on every node):
  torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
      -m istfx.cli.train MODEL.py --subnets 4 --topology sharded

examples:
  istfx train examples/models/mlp_digits.py --subnets 4 --rounds 30 --local-steps 10
  istfx train examples/models/mlp_digits.py --subnets 4 --topology sharded --compress int8
  istfx train examples/models/resnet_digits.py --backend local --subnets 2 --blocks '*' --no-width
  istfx train examples/models/mlp_digits.py --subnets 4 --checkpoint-dir ckpt --checkpoint-every 5
  istfx train examples/models/mlp_digits.py --subnets 4 --checkpoint-dir ckpt --resume

exit status: 0 on success, 2 on a usage or model error, the failing rank's status otherwise."""

# Options that only one backend reads: given with another backend they are an error, not ignored.
BACKEND_OPTIONS: dict[str, tuple[str, ...]] = {
    "torch": ("topology", "compress", "round_timeout"),
    "deepspeed": ("data_parallel", "zero_stage", "grad_accum", "precision"),
    "torch or deepspeed": ("master_port", "timeout", "init_from", "heartbeat_timeout"),
}


def configure_train(p: argparse.ArgumentParser) -> None:
    """The options of ``istfx train`` (and of ``python -m istfx.cli.train``, what the ranks run)."""
    add_compile_options(p)
    t = p.add_argument_group("training")
    t.add_argument("--backend", choices=("torch", "deepspeed", "local"), default="torch",
                   help="torch: one process per subnet over torch.distributed (default); deepspeed: each "
                        "subnet trained by a DeepSpeed engine on --data-parallel ranks; local: one process, "
                        "subnets in turn")
    t.add_argument("--rounds", type=positive_int, default=30, help="IST rounds (default: 30)")
    t.add_argument("--local-steps", type=positive_int, default=10,
                   help="SGD steps per subnet per round (default: 10)")
    t.add_argument("--data", choices=("auto", "digits"), default="auto",
                   help="auto: the file's train_batches() or train_data() when it defines one, else "
                        "scikit-learn's digits (default); digits: the digits whatever the file defines")
    t.add_argument("--batch-size", type=positive_int, default=32, help="batch size of each subnet (default: 32)")
    t.add_argument("--no-shard", action="store_true", help="every subnet draws from the whole training set")
    t.add_argument("--eval-every", type=positive_int, default=1,
                   help="rounds between test evaluations (default: 1)")
    t.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads per process (default: cores / processes)")
    t.add_argument("-q", "--quiet", action="store_true", help="no start-up or per-round lines (errors only)")

    add_optimizer_options(p)

    o = p.add_argument_group("checkpoints and output")
    o.add_argument("--checkpoint-dir", default=None, help="where checkpoints go")
    o.add_argument("--checkpoint-every", type=positive_int, default=5,
                   help="rounds between checkpoints (default: 5)")
    o.add_argument("--keep-checkpoints", type=positive_int, default=2,
                   help="complete checkpoints kept (default: 2)")
    o.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --checkpoint-dir (an error when there is none)")
    o.add_argument("--resume-if-present", action="store_true",
                   help="continue from the newest checkpoint in --checkpoint-dir if there is one, else start "
                        "from round 0")
    o.add_argument("--metrics", default=None, metavar="OUT.jsonl", help="per-round metrics as JSON lines (rank 0)")
    o.add_argument("--save", default=None, metavar="OUT.safetensors",
                   help="write the trained model here (rank 0). --topology sharded never gathers it: every "
                        "rank writes its rows as a sharded checkpoint; OUT.safetensors is then streamed from "
                        "it, a directory name keeps the sharded checkpoint (istfx export makes one file)")

    d = p.add_argument_group("--backend torch or deepspeed (processes on this machine or under torchrun)")
    d.add_argument("--master-port", type=positive_int, default=None,
                   help="rendezvous port on 127.0.0.1 (default: a free one)")
    d.add_argument("--timeout", type=number(above=0.0), default=1800.0,
                   help="seconds a collective or a receive may wait before the job fails (default: 1800)")
    d.add_argument("--init-from", default=None, metavar="STATE.safetensors",
                   help="initial model state (e.g. a --save of another run); ranks build the model on the "
                        "meta device and read only their rows. `istfx train` writes one itself")
    d.add_argument("--heartbeat-timeout", type=number(minimum=0.0), default=60.0,
                   help="a rank whose process is silent this long (stopped, swapped out) is taken as hung: "
                        "the launcher kills it and the job goes on as for a dead rank (0: off; default: 60)")
    d.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed

    tb = p.add_argument_group("--backend torch")
    tb.add_argument("--topology", choices=("ps", "sharded"), default="ps",
                    help="ps: rank 0 holds the model (default); sharded: no rank holds the full model "
                         "(needs a disjoint policy)")
    tb.add_argument("--compress", choices=("none", "int8", "int4"), default="none",
                    help="quantize the exchanged slices (per-row scales; default: none)")
    tb.add_argument("--round-timeout", type=number(above=0.0), default=300.0,
                    help="ps: seconds to wait for a round's results before going on without a rank "
                         "(default: 300)")

    ds = p.add_argument_group("--backend deepspeed")
    ds.add_argument("--data-parallel", type=positive_int, default=1, metavar="D",
                    help="ranks per subnet; the world is subnets x D (default: 1)")
    ds.add_argument("--zero-stage", type=int, choices=(0, 1, 2), default=1, help="ZeRO stage (default: 1)")
    ds.add_argument("--grad-accum", type=positive_int, default=1, metavar="G",
                    help="micro-batches per rank per optimizer step (default: 1)")
    ds.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                    help="engine precision (default: fp32; fp16 needs a GPU)")


def betas(text: str) -> tuple[float, float]:
    """An argparse type: two numbers, ``0.9,0.95``."""
    parts = text.replace(",", " ").split()
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.9,0.95, got {text!r}")
    return values  # type: ignore[return-value]


def add_optimizer_options(p: argparse.ArgumentParser) -> None:
    """How every subnet is optimized (``istfx.runtime.optimizers.TrainingRecipe``): the inner optimizer, its
    schedule and clipping, whether its state travels with the units, and the outer step on the write-back."""
    g = p.add_argument_group("optimizer (every backend)")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="inner optimizer of every subnet (default: sgd)")
    g.add_argument("--lr", type=number(above=0.0), default=0.1, help="peak learning rate (default: 0.1)")
    g.add_argument("--momentum", type=number(minimum=0.0), default=0.9, help="SGD momentum (default: 0.9)")
    g.add_argument("--weight-decay", type=number(minimum=0.0), default=0.0,
                   help="SGD's L2 / AdamW's decoupled weight decay (default: 0)")
    g.add_argument("--betas", type=betas, default=(0.9, 0.999), metavar="B1,B2",
                   help="AdamW's betas (default: 0.9,0.999)")
    g.add_argument("--warmup-steps", type=non_negative_int, default=0,
                   help="linear learning-rate warm-up over this many steps per subnet (default: 0)")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="after the warm-up: constant, or a cosine decay to 0 at the last step (default: constant)")
    g.add_argument("--clip-grad-norm", type=number(above=0.0), default=None, metavar="NORM",
                   help="clip every step's gradient to this L2 norm (default: off)")
    g.add_argument("--optimizer-state", choices=("reset", "carry"), default="reset",
                   help="carry: momentum and Adam moments travel with their units across rounds; reset: a fresh "
                        "optimizer every round, as in the IST paper (default: reset)")
    g.add_argument("--outer-lr", type=number(above=0.0), default=1.0,
                   help="outer Nesterov step on each round's change, as DiLoCo's (e.g. 0.7; default 1: the plain "
                        "write-back)")
    g.add_argument("--outer-momentum", type=number(minimum=0.0), default=0.0,
                   help="outer Nesterov momentum (e.g. 0.9; default 0)")


def check_backend_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Stop (``parser.error``) when an option of one backend is given with another backend."""
    flags = {a.dest: a.option_strings[-1] if a.option_strings[-1].startswith("--") else a.option_strings[0]
             for a in parser._actions if a.option_strings}
    for owner, dests in BACKEND_OPTIONS.items():
        if args.backend in owner.split(" or "):
            continue
        given = [flags[d] for d in dests if getattr(args, d) != parser.get_default(d)]
        if given:
            parser.error(f"{', '.join(given)} {'is an option' if len(given) == 1 else 'are options'} of "
                         f"--backend {owner}, not of --backend {args.backend}")
