"""IST vs full training of a byte-level GPT at equal wall-clock time on this machine.

    python benchmarks/gpt_ist.py                       # ~9 minutes on 2 cores
    python benchmarks/gpt_ist.py --budget 20           # a quick look

The GPT of ``examples/gpt_text.py`` (``istfx.models.GPT``: 4 layers, 8
heads, d_model 128, context 64 bytes) learns ``pydoc_data.topics``. Three
runs start from the same weights and each gets ``--budget`` seconds of
training on one thread, one run after another:

- ``full``: AdamW on the whole model;
- ``ist2``, ``ist4``: ``istfx.fit`` with S = 2 and 4 subnets (attention
  heads and MLP units dealt out every round, ``--local-steps`` AdamW steps
  per subnet per round, optimizer state carried across rounds). Each
  evaluation scores the reassembled model twice: as it is, and with the
  split units' residual-branch outputs scaled by 1/S (each unit trains in
  one subnet of S; dropout scales at inference the same way).

Here the S subnets of a round train one after another on one core, so the
wall-clock axis charges IST for all of them; with one worker per subnet
they would run side by side. The second axis, "S workers", charges each
round its cut/write-back time plus its slowest subnet: what a round would
take with S workers and free communication. Evaluation (validation loss of
the full model on 128 fixed windows) is not counted in either.

Writes ``docs/gpt_ist.json`` (every curve point), ``docs/gpt_ist.png``
(validation loss vs seconds) and the results section of
``docs/transformers.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

import istfx
from istfx.backends import LocalBackend, RoundResult
from istfx.models import GPT, GPTConfig
from istfx.models.gpt import lm_loss

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from gpt_text import (  # noqa: E402
    RandomWindows, adamw, add_gpt_arguments, fixed_windows, load_text, split_bytes, width_scaled,
)

BEGIN, END = "<!-- gpt_ist:begin -->", "<!-- gpt_ist:end -->"


class BudgetSpent(Exception):
    """Raised by :class:`TimedBackend` once the training budget is used up (fit has no time limit)."""


class Curve:
    """Validation loss at points in training time, evaluated outside the timed region."""

    def __init__(self, val: list, budget: float, points: int) -> None:
        self.val, self.budget = val, budget
        self.every = budget / points
        self.next = 0.0
        self.rows: list[dict] = []

    def due(self, seconds: float) -> bool:
        return seconds + 1e-9 >= self.next

    def maybe_eval(self, model: torch.nn.Module, seconds: float, parallel: float, steps: int, samples: int,
                   final: bool = False, cpu: float = 0.0, ist: istfx.ISTModel | None = None) -> None:
        if not self.due(seconds) and not final:
            return
        row = {"seconds": round(seconds, 3), "parallel_seconds": round(parallel, 3), "cpu_seconds": round(cpu, 3),
               "steps": steps, "samples": samples,
               "val_loss": istfx.evaluate(model, self.val, loss_fn=lm_loss)["loss"]}
        if ist is not None:  # the same weights, split units' branch outputs scaled by 1/S
            with width_scaled(ist, 1.0 / ist.plan.subnets) as scaled:
                row["val_loss_scaled"] = istfx.evaluate(scaled, self.val, loss_fn=lm_loss)["loss"]
        self.rows.append(row)
        while self.next <= seconds:
            self.next += self.every


class TimedBackend(LocalBackend):
    """The local backend, timed: trains a round's subnets one after another and stops at the budget.

    ``seconds`` is the round's wall-clock; ``parallel`` charges the round its
    decompose/reassemble time plus its slowest subnet (S workers side by side).
    """

    name = "timed-local"

    def __init__(self, curve: Curve, budget: float) -> None:
        super().__init__()
        self.curve, self.budget = curve, budget
        self.seconds = self.parallel = self.cpu = 0.0
        self.steps = self.samples = 0

    def run_round(self, ist: istfx.ISTModel, round: int, train_subnet) -> RoundResult:
        cpu = time.process_time()
        result = super().run_round(ist, round, train_subnet)
        per_subnet = result.extra["subnet_seconds"]
        self.cpu += time.process_time() - cpu
        self.seconds += result.seconds
        self.parallel += result.seconds - sum(per_subnet) + max(per_subnet)
        self.steps += result.results[0].steps
        self.samples += result.samples
        done = self.seconds >= self.budget
        with ist.inference_scaling():
            self.curve.maybe_eval(ist.model, self.seconds, self.parallel, self.steps, self.samples, final=done,
                                  cpu=self.cpu, ist=ist)
        if done:
            raise BudgetSpent
        return result


def run_full(model: GPT, train: RandomWindows, curve: Curve, budget: float, lr: float) -> dict:
    optimizer = adamw(lr)(list(model.parameters()))
    gen = torch.Generator().manual_seed(train.seed)
    seconds, cpu, steps = 0.0, 0.0, 0
    curve.maybe_eval(model, 0.0, 0.0, 0, 0)
    model.train()
    while seconds < budget:
        start, cpu_start = time.perf_counter(), time.process_time()
        x, y = train.batch(gen)
        loss = lm_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds += time.perf_counter() - start
        cpu += time.process_time() - cpu_start
        steps += 1
        curve.maybe_eval(model, seconds, seconds, steps, steps * train.batch_size, final=seconds >= budget, cpu=cpu)
        model.train()
    return {"steps": steps, "compile_seconds": 0.0}


def run_ist(model: GPT, subnets: int, train: RandomWindows, curve: Curve, budget: float, lr: float,
            local_steps: int, example: torch.Tensor) -> dict:
    start = time.perf_counter()
    ist = istfx.compile(model, subnets=subnets, example_inputs=(example,))
    compile_seconds = time.perf_counter() - start
    curve.maybe_eval(model, 0.0, 0.0, 0, 0, ist=ist)
    backend = TimedBackend(curve, budget)
    try:
        istfx.fit(ist, train, rounds=10**9, local_steps=local_steps, optimizer=adamw(lr), loss_fn=lm_loss,
                  backend=backend, carry_optimizer_state=True, progress=False)
    except BudgetSpent:
        pass
    return {"steps_per_subnet": backend.steps, "compile_seconds": compile_seconds,
            "parameters_per_subnet": ist.plan.parameters_per_subnet, "parameters_full": ist.plan.parameters_full,
            "split_groups": len(ist.plan.split)}


def at(rows: list[dict], seconds: float, key: str = "seconds") -> float:
    """Validation loss after `seconds` of training, linearly interpolated between evaluations."""
    for a, b in zip(rows, rows[1:]):
        if a[key] <= seconds <= b[key]:
            w = 0.0 if b[key] == a[key] else (seconds - a[key]) / (b[key] - a[key])
            return a["val_loss"] + w * (b["val_loss"] - a["val_loss"])
    return rows[-1]["val_loss"] if seconds >= rows[-1][key] else rows[0]["val_loss"]


def reach_time(rows: list[dict], target: float, key: str) -> float | None:
    """Training seconds at which the validation loss first reaches `target` (interpolated), or None."""
    for a, b in zip(rows, rows[1:]):
        if b["val_loss"] <= target + 1e-9:
            if a["val_loss"] <= target:
                return a[key]
            w = (a["val_loss"] - target) / (a["val_loss"] - b["val_loss"])
            return a[key] + w * (b[key] - a[key])
    return None


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for k, (name, run) in enumerate(results["runs"].items()):
        rows = run["curve"]
        label = "full model" if name == "full" else f"IST S={run['subnets']}"
        color = f"C{k}"
        for ax, key in zip(axes, ("seconds", "parallel_seconds")):
            ax.plot([r[key] for r in rows], [r["val_loss"] for r in rows], marker=".", color=color, label=label)
            if "val_loss_scaled" in rows[0]:
                ax.plot([r[key] for r in rows], [r["val_loss_scaled"] for r in rows], ls="--", color=color,
                        label=f"{label}, branch outputs x 1/S at eval")
    for ax in axes:
        ax.axhline(results["target"], color="grey", lw=0.8, ls="--")
    axes[0].set_title("one core, subnets one after another")
    axes[1].set_title("S workers side by side (slowest subnet per round)")
    for ax in axes:
        ax.set_xlabel("training seconds")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (nats/byte)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Byte-level GPT on pydoc_data.topics: IST (heads + MLP units) vs full training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(results: dict, command: str) -> str:
    cfg = results["config"]
    budget = results["budget_seconds"]
    lines = [
        f"Command: `{command}` ({results['machine']}, torch {results['torch']}, "
        f"{results['threads']} thread per run, runs one after another).",
        "",
        f"GPT: {cfg['n_layer']} layers, {cfg['n_head']} heads, d_model {cfg['n_embd']}, context "
        f"{cfg['block_size']} bytes, {results['parameters_full']:,} parameters; batch {results['batch_size']}, "
        f"AdamW lr {results['lr']}; IST: {results['local_steps']} local steps per round, optimizer state carried.",
        "",
        f"Target: the full model's validation loss after {budget:.0f} s, {results['target']:.3f}. "
        "\"S workers\" is the same run's time with one worker per subnet (slowest subnet per round). "
        "\"x 1/S at eval\": the same IST weights evaluated with what split heads and MLP units add to the "
        "residual stream scaled by 1/S (`width_scaled` in `examples/gpt_text.py`).",
        "",
        f"| run | parameters per subnet | optimizer steps (per subnet) | val loss after {budget:.0f} s, one core "
        f"| after {budget / 2:.0f} s, one core | the run with S workers takes | full model's val loss at that time "
        "| time to target, one core / S workers |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    full_rows = results["runs"]["full"]["curve"]
    for name, run in results["runs"].items():
        label = "full" if name == "full" else f"IST S={run['subnets']}"
        per = f"{max(run['parameters_per_subnet']):,}" if "parameters_per_subnet" in run else \
            f"{results['parameters_full']:,}"
        steps = run.get("steps_per_subnet", run.get("steps"))
        variants = [(label, run["curve"])]
        if "val_loss_scaled" in run["curve"][0]:
            variants.append((f"{label}, x 1/S at eval",
                             [{**r, "val_loss": r["val_loss_scaled"]} for r in run["curve"]]))
        for text, rows in variants:
            parallel = rows[-1]["parallel_seconds"]
            reach = [reach_time(rows, results["target"], key) for key in ("seconds", "parallel_seconds")]
            shown = " / ".join("not reached" if t is None else f"{t:.0f} s" for t in reach)
            lines.append(f"| {text} | {per} | {steps:,} | {rows[-1]['val_loss']:.3f} | {at(rows, budget / 2):.3f} | "
                         f"{parallel:.0f} s | {at(full_rows, parallel):.3f} | {shown} |")
    shares = ", ".join(
        f"{'full' if n == 'full' else 'IST S=' + str(r['subnets'])} {r['curve'][-1]['cpu_seconds'] / r['curve'][-1]['seconds']:.0%}"
        for n, r in results["runs"].items() if r["curve"][-1].get("cpu_seconds"))
    if shares:
        lines += ["", f"CPU time over wall-clock time while training (100% = the run had its core to itself): {shares}."]
    lines += ["", "![validation loss vs training seconds](gpt_ist.png)", "",
              "Raw curves: [`gpt_ist.json`](gpt_ist.json)."]
    return "\n".join(lines)


def write_section(doc: Path, text: str) -> None:
    body = doc.read_text() if doc.exists() else f"{BEGIN}\n{END}\n"
    if BEGIN not in body:
        body += f"\n{BEGIN}\n{END}\n"
    head, rest = body.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=150.0, help="training seconds per run")
    parser.add_argument("--points", type=int, default=20, help="evaluations per run")
    add_gpt_arguments(parser)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--render", action="store_true", help="redraw the plot and section from the saved JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.render:
        results = json.loads((args.out / "gpt_ist.json").read_text())
        plot(results, args.out / "gpt_ist.png")
        section = markdown(results, results.get("command", "python benchmarks/gpt_ist.py"))
        write_section(args.out / "transformers.md", section)
        print(section)
        return results

    train_tokens, val_tokens = split_bytes(load_text())
    config = GPTConfig(vocab_size=256, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd)
    torch.manual_seed(args.seed)
    initial = GPT(config).state_dict()
    val = fixed_windows(val_tokens, args.block_size, 32, batches=4)
    example = train_tokens[: 2 * (args.block_size // 2)].view(2, args.block_size // 2)

    def fresh() -> GPT:
        model = GPT(config)
        model.load_state_dict(initial)
        return model

    runs: dict[str, dict] = {}
    for name, subnets in [("full", 1)] + [(f"ist{s}", s) for s in args.subnets]:
        train = RandomWindows(train_tokens, args.block_size, args.batch_size, args.seed)
        curve = Curve(val, args.budget, args.points)
        model = fresh()
        start = time.perf_counter()
        if subnets == 1:
            info = run_full(model, train, curve, args.budget, args.lr)
        else:
            info = run_ist(model, subnets, train, curve, args.budget, args.lr, args.local_steps, example)
        runs[name] = {"subnets": subnets, **info, "wall_seconds": time.perf_counter() - start, "curve": curve.rows}
        last = curve.rows[-1]
        print(f"{name:>5}: val loss {last['val_loss']:.3f} after {last['seconds']:.0f}s of training "
              f"({last['parallel_seconds']:.0f}s with S workers), {info.get('steps_per_subnet', info.get('steps'))} "
              f"steps{' per subnet' if subnets > 1 else ''}", flush=True)

    results = {
        "config": {k: getattr(config, k) for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")},
        "parameters_full": sum(p.numel() for p in fresh().parameters()),
        "budget_seconds": args.budget, "batch_size": args.batch_size, "lr": args.lr,
        "local_steps": args.local_steps, "threads": 1, "seed": args.seed,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "torch": torch.__version__.split("+")[0],
        "text_bytes": {"train": len(train_tokens), "val": len(val_tokens)},
        "uniform_loss": math.log(256), "target": runs["full"]["curve"][-1]["val_loss"], "runs": runs,
    }
    command = ("python benchmarks/gpt_ist.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    results["command"] = command
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpt_ist.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "gpt_ist.png")
    section = markdown(results, command)
    write_section(args.out / "transformers.md", section)
    print(section)
    return results


if __name__ == "__main__":
    main()
