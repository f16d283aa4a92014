"""Federated benchmark: FedAvg, HeteroFL-style, FedRolex-style and IST on the same Flower federation.

Every method runs as one ``istfx fl`` command (a SuperLink and one SuperNode
per client as local processes, Flower's deployment engine) on the same model
file, clients, participation, Dirichlet(α) label partition, local steps,
batch size and seed; only the strategy and the policy differ:

============  ============================================================================
fedavg        Flower's own FedAvg: the full model on every sampled client
heterofl      HeteroFL-style nested sub-models: ``--policy nested --sizes 1,0.5,0.25,0.25``
fedrolex      FedRolex-style rolling sub-models: ``--policy rolling``
ist           IST, disjoint subnets: ``--policy disjoint``
ist-overlap   IST, overlapping subnets: ``--policy overlap(KEEP)``
============  ============================================================================

Tuning is the same for every method: each (model, method) tries the same
learning-rate grid at the tuning α and keeps the one with the best final
validation accuracy (the validation set is the one reported: this is the
usual optimistic selection, applied equally); every other α reuses it. When
the grid is incomplete for any method, no method is tuned: all run at the
default rate 0.1.

    python benchmarks/federated.py                       # the headline grid (long: see docs/federated.md)
    python benchmarks/federated.py --grid quick          # one short run per method, a smoke test
    python benchmarks/federated.py --queue mlp/ist/0.5/0.1,mlp/fedavg/0.5/0.1   # these runs, in this order
    python benchmarks/federated.py --collect             # JSON, tables, plots of every run in --work
    python benchmarks/federated.py --report              # tables and plots again from docs/federated.json

Each run writes its JSON lines under ``--work`` and is skipped when they are
already complete there, so an interrupted grid resumes. The results go to
``docs/federated.json`` (every round of every run), ``docs/federated_*.png``
and the generated section of ``docs/federated.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from mdsection import write_section  # noqa: E402

DOCS = ROOT / "docs"
MODELS = {"mlp": "examples/models/mlp_digits.py", "cnn": "examples/models/cnn_digits.py",
          "gpt": "examples/models/gpt_text_clients.py"}
TITLES = {"mlp": "MLP 64-256-256-10 on the 8x8 digits", "cnn": "Small CNN on the 8x8 digits",
          "gpt": "Byte-level GPT on help() topics, whole topics per client"}


@dataclass(frozen=True)
class Method:
    """One federated method: its label and the ``istfx fl`` options that make it."""

    name: str
    label: str
    args: tuple[str, ...]


METHODS = {m.name: m for m in (
    Method("fedavg", "FedAvg (Flower, full model)", ("--strategy", "fedavg")),
    Method("heterofl", "HeteroFL-style (nested prefixes, sizes 1,1/2,1/4,1/4)",
           ("--strategy", "ist", "--policy", "nested", "--sizes", "1,0.5,0.25,0.25")),
    Method("fedrolex", "FedRolex-style (rolling windows)", ("--strategy", "ist", "--policy", "rolling")),
    Method("ist", "IST disjoint", ("--strategy", "ist", "--policy", "disjoint")),
    Method("ist-overlap", "IST overlap(0.5)", ("--strategy", "ist", "--policy", "overlap(0.5)")),
)}


@dataclass(frozen=True)
class Run:
    """One ``istfx fl`` run: everything that sets it apart."""

    model: str
    method: str
    alpha: str  # "0.5", "0.1", "iid"
    lr: float
    clients: int = 16
    subnets: int = 4
    rounds: int = 20
    participation: float = 0.25
    local_steps: int = 10
    batch_size: int = 32
    optimizer: str = "sgd"
    seed: int = 0

    @property
    def key(self) -> str:
        """A file-name-safe identifier."""
        return (f"{self.model}_{self.method}_a{self.alpha}_lr{self.lr:g}_c{self.clients}_s{self.subnets}"
                f"_r{self.rounds}_p{self.participation:g}_l{self.local_steps}_b{self.batch_size}"
                f"_{self.optimizer}_seed{self.seed}")

    @classmethod
    def from_key(cls, key: str) -> "Run":
        """The run whose :attr:`key` is `key`."""
        model, method, alpha, lr, clients, subnets, rounds, part, local, batch, optimizer, seed = key.split("_")
        return cls(model, method, alpha[1:], float(lr[2:]), int(clients[1:]), int(subnets[1:]), int(rounds[1:]),
                   float(part[1:]), int(local[1:]), int(batch[1:]), optimizer, int(seed[4:]))

    def command(self, metrics: Path) -> list[str]:
        """The ``istfx fl`` command line of this run, writing its rounds to `metrics`."""
        data = [] if self.model == "gpt" else ["--dirichlet", self.alpha]
        return [sys.executable, "-m", "istfx.cli", "fl", MODELS[self.model],
                "--clients", str(self.clients), "--subnets", str(self.subnets), "--rounds", str(self.rounds),
                "--participation", f"{self.participation:g}", *data,
                "--local-steps", str(self.local_steps), "--batch-size", str(self.batch_size),
                "--optimizer", self.optimizer, "--lr", f"{self.lr:g}", "--seed", str(self.seed),
                *METHODS[self.method].args, "--metrics", str(metrics)]


@dataclass
class Grid:
    """Which runs a benchmark makes: models x methods x α, a learning-rate grid tried at `tune_alpha`."""

    models: tuple[str, ...]
    methods: tuple[str, ...]
    alphas: dict[str, tuple[str, ...]]  # model -> α values
    lrs: tuple[float, ...]
    tune_alpha: str
    base: dict = field(default_factory=dict)  # Run fields shared by every run

    def tuning_runs(self) -> list[Run]:
        return [Run(model, method, self.tune_alpha, lr, **self.base)
                for model in self.models for lr in self.lrs for method in self.methods]

    def other_runs(self, chosen: dict[tuple[str, str], float]) -> list[Run]:
        return [Run(model, method, alpha, chosen[(model, method)], **self.base)
                for model in self.models for method in self.methods
                for alpha in self.alphas[model] if alpha != self.tune_alpha and (model, method) in chosen]


GRIDS = {
    "headline": lambda: Grid(models=("mlp", "cnn"), methods=tuple(METHODS),
                             alphas={"mlp": ("0.5", "0.1", "iid"), "cnn": ("0.5",)},
                             lrs=(0.1, 0.03), tune_alpha="0.5",
                             base=dict(clients=16, subnets=4, rounds=8, participation=0.25, local_steps=20,
                                       batch_size=32)),
    "quick": lambda: Grid(models=("mlp",), methods=tuple(METHODS), alphas={"mlp": ("0.5",)}, lrs=(0.1,),
                          tune_alpha="0.5", base=dict(clients=8, subnets=2, rounds=2, participation=0.25,
                                                      local_steps=2, batch_size=32)),
}


# -- running ---------------------------------------------------------------------------------------------------


def read_rounds(path: Path) -> list[dict]:
    """The JSON lines of a metrics file (an incomplete last line, from a killed run, is left out)."""
    if not path.exists():
        return []
    rounds = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rounds.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rounds


def execute(run: Run, work: Path, timeout: float, start: bool = True) -> dict:
    """Run `run` (unless its complete metrics are already in `work`) and return its record; with
    ``start=False`` only read what `work` holds."""
    metrics = work / f"{run.key}.jsonl"
    log = work / f"{run.key}.log"
    cached = read_rounds(metrics)
    record = {"run": asdict(run), "command": shlex.join(run.command(metrics.relative_to(work))
                                                        ).replace(sys.executable, "python")}
    done = work / f"{run.key}.done"
    if len(cached) >= run.rounds and not done.exists() and log.exists() and \
            f"done: {run.rounds} rounds" in log.read_text(errors="replace"):  # finished after its invocation ended
        done.write_text(json.dumps({"rc": 0, "wall_s": None}))
    if len(cached) >= run.rounds and done.exists():
        meta = json.loads(done.read_text())
        return {**record, **meta, "rounds": cached}
    if not start:
        errors = [line for line in (log.read_text(errors="replace").splitlines() if log.exists() else [])
                  if line.startswith("istfx: error:")]
        return {**record, "rc": None, "wall_s": None, "rounds": cached, "error": errors[-1] if errors else None}
    metrics.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print(f"[federated] {run.key} ...", flush=True)
    start = time.perf_counter()
    with log.open("w") as out:
        try:
            rc = subprocess.run(["nice", "-n", "5", *run.command(metrics)], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - start
    rounds = read_rounds(metrics)
    meta = {"rc": rc, "wall_s": round(wall, 1)}
    if rc != 0 or len(rounds) < run.rounds:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        meta["error"] = "\n".join(tail)
        print(f"[federated] {run.key} FAILED (rc {rc}, {len(rounds)}/{run.rounds} rounds):\n" + meta["error"],
              flush=True)
    else:
        (work / f"{run.key}.done").write_text(json.dumps(meta))
        print(f"[federated] {run.key} done in {wall:.0f}s: final accuracy "
              f"{rounds[-1].get('val_accuracy')}", flush=True)
    return {**record, **meta, "rounds": rounds}


def partitions(models: tuple[str, ...], alphas: dict[str, tuple[str, ...]], clients: int, seed: int) -> dict:
    """The label partition each client of the federation trains on, as the engine deals it
    (``istfx.flower.data.client_indices``), per model and α: sizes, histograms, skew."""
    import torch

    from istfx.cli.loader import load_model_file
    from istfx.flower.data import client_indices, datasets
    from istfx.runtime.federated_data import LabelPartition, labels_of, parse_alpha

    out = {}
    for model in models:
        if model == "gpt":
            continue
        train, _ = datasets(load_model_file(ROOT / MODELS[model]), "auto", seed)
        labels = labels_of(train)
        for alpha in alphas[model]:
            engine_alpha = None if math.isinf(parse_alpha(alpha)) else parse_alpha(alpha)
            indices = tuple(torch.as_tensor(client_indices(train, c, clients, engine_alpha, seed))
                            for c in range(clients))
            histograms = torch.stack([torch.bincount(labels[i], minlength=int(labels.max()) + 1) for i in indices])
            out[f"{model} {alpha}"] = LabelPartition(indices, histograms, parse_alpha(alpha), seed).summary()
    return out


def partition_table(summaries: dict) -> str:
    """Markdown: how skewed each federation's data is."""
    lines = ["| data, α | samples per client (min / median / max) | classes per client (mean) "
             "| label skew (mean TV distance to the global mix) |", "|---|---|---|---|"]
    for name, s in summaries.items():
        sizes = sorted(s["sizes"])
        lines.append(f"| {name} | {sizes[0]} / {sizes[len(sizes) // 2]} / {sizes[-1]} "
                     f"| {sum(s['classes_per_client']) / len(sizes):.1f} | {s['skew_tv']:.3f} |")
    return "\n".join(lines) + "\n"


def _compile_options(method: Method, subnets: int) -> dict:
    """The ``istfx.compile`` keyword arguments of an IST-family method's ``istfx fl`` options."""
    args = list(method.args)
    options = {"subnets": subnets}
    if "--policy" in args:
        options["policy"] = args[args.index("--policy") + 1]
    if "--sizes" in args:
        options["sizes"] = tuple(float(v) for v in args[args.index("--sizes") + 1].split(","))
    return options


def compute_profile(model: str, local_steps: int, batch_size: int, subnets: int, repeats: int = 7) -> dict:
    """Per method, in this one process: parameters a client holds and the warm CPU time of one round's local
    steps (least of `repeats`), for the full model (FedAvg) and each subnet slot of round 0 (IST family).

    The federated runs time the same steps inside fresh ClientApp processes, where one-time costs
    (a FedAvg client's first ``torch.optim`` construction imports ``torch._dynamo``, several seconds; an
    IST client pays it while compiling, outside the timed steps) and the machine's load get in; this
    profile is the like-for-like comparison of the training work itself.
    """
    import torch

    import istfx
    from istfx.cli.loader import load_model_file
    from istfx.flower.local import train_steps
    from istfx.runtime.optimizers import TrainingRecipe

    torch.set_num_threads(1)
    loaded = load_model_file(ROOT / MODELS[model])
    train = loaded.module.train_data()
    xs, ys = train.tensors
    generator = torch.Generator().manual_seed(0)
    batches = [(xs[idx], ys[idx]) for idx in (torch.randint(len(ys), (batch_size,), generator=generator)
                                               for _ in range(local_steps))]
    build = TrainingRecipe(optimizer="sgd", lr=0.01, momentum=0.9).build
    loss = torch.nn.functional.cross_entropy

    def timed(module) -> float:
        """Least CPU time of `repeats` rounds: the machine is shared, CPU time and the minimum shed the wait."""
        params = [p for p in module.parameters() if p.requires_grad]
        train_steps(module, params, batches, build, loss)  # warm-up: lazy imports, allocator
        times = []
        for _ in range(repeats):
            begin = time.process_time()
            train_steps(module, params, batches, build, loss)
            times.append(time.process_time() - begin)
        return min(times)

    full_params = sum(p.numel() for p in loaded.model.parameters())
    out = {"fedavg": {"params": [full_params], "seconds": [timed(loaded.model)]}}
    for method in METHODS.values():
        if method.name == "fedavg":
            continue
        ist = istfx.compile(load_model_file(ROOT / MODELS[model]).model, example_inputs=loaded.example_inputs,
                            **_compile_options(method, subnets))
        parts = ist.decompose(0)
        out[method.name] = {"params": [sum(p.numel() for p in part.parameters()) for part in parts],
                            "seconds": [timed(part) for part in parts]}
    for entry in out.values():
        entry["mean_params_fraction"] = sum(entry["params"]) / len(entry["params"]) / full_params
        entry["mean_seconds"] = sum(entry["seconds"]) / len(entry["seconds"])
    return out


def profile_table(profile: dict) -> str:
    """Markdown: parameters held and warm local-training time per client, per method."""
    base = profile["fedavg"]["mean_seconds"]
    lines = ["| method | parameters held per client (per slot) | × full model | local steps per round, warm CPU time (ms, "
             "mean over slots) | × FedAvg |", "|---|---|---|---|---|"]
    for name, entry in profile.items():
        lines.append(f"| {METHODS[name].label} | {', '.join(f'{p:,}' for p in entry['params'])} "
                     f"| {entry['mean_params_fraction']:.3f} | {1000 * entry['mean_seconds']:.1f} "
                     f"| {entry['mean_seconds'] / base:.2f} |")
    return "\n".join(lines) + "\n"


# -- summaries -------------------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def bytes_per_client(r: dict) -> float:
    """Bytes one participating client moved in a round: down + up."""
    return (r.get("bytes_down_per_client") or 0) + (r.get("bytes_up_per_client") or 0)


def summarize(record: dict) -> dict:
    """Final and best accuracy, per-client bytes and compute per round, peak client memory of one run."""
    rounds = record["rounds"]
    if not rounds:
        return {"complete": False}
    return {
        "complete": record.get("rc") == 0 and len(rounds) >= record["run"]["rounds"],
        "final_accuracy": rounds[-1].get("val_accuracy"),
        "best_accuracy": max((r.get("val_accuracy") or 0.0) for r in rounds),
        "last3_accuracy": _mean([r.get("val_accuracy") for r in rounds[-3:]]),
        "final_loss": rounds[-1].get("val_loss"),
        "bytes_per_client_per_round": _mean([bytes_per_client(r) for r in rounds]),
        "bytes_down_per_client_per_round": _mean([r.get("bytes_down_per_client") for r in rounds]),
        "bytes_up_per_client_per_round": _mean([r.get("bytes_up_per_client") for r in rounds]),
        "bytes_total": sum(r.get("bytes_total") or 0 for r in rounds),
        "client_peak_memory_bytes": max((r.get("client_peak_memory_bytes") or 0) for r in rounds),
        "client_compute_seconds_per_round": _mean([r.get("client_compute_seconds") for r in rounds]),
        "clients_dropped": sum(r.get("clients_dropped") or 0 for r in rounds),
        "elapsed_s": rounds[-1].get("elapsed_s"),
    }


def choose(records: list[dict], metric: str = "final_accuracy") -> dict[tuple[str, str], float]:
    """Per (model, method): the learning rate whose complete run scored best."""
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for rec in records:
        summary = rec["summary"]
        if not summary.get("complete") or summary.get(metric) is None:
            continue
        key = (rec["run"]["model"], rec["run"]["method"])
        if key not in best or summary[metric] > best[key][0]:
            best[key] = (summary[metric], rec["run"]["lr"])
    return {key: lr for key, (_, lr) in best.items()}


TUNE_ALPHA = "0.5"
DEFAULT_LR = 0.1


def headline(records: list[dict]) -> list[dict]:
    """The chosen run of every (model, method, α): at the learning rate that scored best at
    :data:`TUNE_ALPHA` for that (model, method); where that rate was not run, the only complete run there is."""
    tune = [rec for rec in records if rec["run"]["alpha"] == TUNE_ALPHA and rec["summary"].get("complete")]
    grid = {rec["run"]["lr"] for rec in tune}
    tried = {}
    for rec in tune:
        tried.setdefault((rec["run"]["model"], rec["run"]["method"]), set()).add(rec["run"]["lr"])
    if all(lrs == grid for lrs in tried.values()):  # every method tried every rate: the tuned choice
        chosen = choose(tune)
    else:  # an incomplete grid would tune some methods and not others: every method at the default rate
        chosen = {key: DEFAULT_LR for key in tried}
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for rec in records:
        if rec["summary"].get("complete"):
            groups.setdefault((rec["run"]["model"], rec["run"]["method"], rec["run"]["alpha"]), []).append(rec)
    out = []
    for (model, method, _), recs in groups.items():
        pick = [rec for rec in recs if rec["run"]["lr"] == chosen.get((model, method))]
        if pick or len(recs) == 1:
            out.append((pick or recs)[0])
    return out


# -- report ----------------------------------------------------------------------------------------------------

MB = 1e6


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def tables(records: list[dict]) -> str:
    """Markdown: per (model, α), each method's chosen run; then the tuning grid."""
    chosen = headline(records)
    lines = []
    for model in dict.fromkeys(rec["run"]["model"] for rec in chosen):
        for alpha in dict.fromkeys(rec["run"]["alpha"] for rec in chosen if rec["run"]["model"] == model):
            rows = [rec for rec in chosen if rec["run"]["model"] == model and rec["run"]["alpha"] == alpha]
            base = next((rec for rec in rows if rec["run"]["method"] == "fedavg"), None)
            run = rows[0]["run"]
            lines += [f"**{TITLES[model]}, α = {alpha}** ({run['clients']} clients, {run['subnets']} subnets, "
                      f"participation {run['participation']:g}, {run['rounds']} rounds of {run['local_steps']} "
                      f"local steps, batch {run['batch_size']}, {run['optimizer']})", "",
                      "| method | lr | final acc | mean of last 3 rounds | best acc | Δ final vs FedAvg (points) "
                      "| Δ last 3 (points) | MB per client per round "
                      "| × FedAvg bytes | peak client memory (MB) | client compute per round (s) | × FedAvg compute |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for rec in sorted(rows, key=lambda r: list(METHODS).index(r["run"]["method"])):
                s = rec["summary"]
                b = base["summary"] if base else {}
                delta = (100 * (s["final_accuracy"] - b["final_accuracy"])
                         if base and s["final_accuracy"] is not None and b.get("final_accuracy") is not None else None)
                delta3 = (100 * (s["last3_accuracy"] - b["last3_accuracy"])
                          if base and s["last3_accuracy"] is not None and b.get("last3_accuracy") is not None else None)
                ratio_bytes = (s["bytes_per_client_per_round"] / b["bytes_per_client_per_round"]
                               if base and b.get("bytes_per_client_per_round") else None)
                ratio_compute = (s["client_compute_seconds_per_round"] / b["client_compute_seconds_per_round"]
                                 if base and b.get("client_compute_seconds_per_round") else None)
                lines.append(
                    f"| {METHODS[rec['run']['method']].label} | {rec['run']['lr']:g} "
                    f"| {_fmt(s['final_accuracy'], '.4f')} | {_fmt(s['last3_accuracy'], '.4f')} "
                    f"| {_fmt(s['best_accuracy'], '.4f')} | {_fmt(delta, '+.1f')} | {_fmt(delta3, '+.1f')} | {_fmt(s['bytes_per_client_per_round'] and s['bytes_per_client_per_round'] / MB, '.4f')} "
                    f"| {_fmt(ratio_bytes, '.3f')} | {_fmt(s['client_peak_memory_bytes'] / MB, '.1f')} "
                    f"| {_fmt(s['client_compute_seconds_per_round'], '.3f')} | {_fmt(ratio_compute, '.3f')} |")
            lines.append("")
    tune = [rec for rec in records if rec["run"]["alpha"] == TUNE_ALPHA]
    if len({rec["run"]["lr"] for rec in tune}) > 1:
        lines += ["**Learning-rate grid** (final accuracy at α = 0.5; when every method tried every rate, the "
                  "best of each row is used at every α, otherwise every method uses the default 0.1)", "", "| model | method | " + " | ".join(
                      f"lr {lr:g}" for lr in sorted({rec["run"]["lr"] for rec in tune})) + " |",
                  "|---|---|" + "---|" * len({rec["run"]["lr"] for rec in tune})]
        lrs = sorted({rec["run"]["lr"] for rec in tune})
        for model in dict.fromkeys(rec["run"]["model"] for rec in tune):
            for method in METHODS:
                cells = []
                for lr in lrs:
                    hit = [rec for rec in tune if rec["run"]["model"] == model and rec["run"]["method"] == method
                           and rec["run"]["lr"] == lr]
                    acc = hit[0]["summary"].get("final_accuracy") if hit else None
                    cells.append("failed" if hit and not hit[0]["summary"].get("complete") else _fmt(acc, ".4f"))
                if any(c != "-" for c in cells):
                    lines.append(f"| {model} | {METHODS[method].label} | " + " | ".join(cells) + " |")
        lines.append("")
    failed = [rec for rec in records if not rec["summary"].get("complete")]
    if failed:
        lines += ["**Runs that did not complete**", ""]
        lines += [f"- `{rec['run']['model']} {rec['run']['method']} α={rec['run']['alpha']} lr={rec['run']['lr']:g}`: "
                  f"{len(rec['rounds'])}/{rec['run']['rounds']} rounds"
                  + (f" ({(rec.get('error') or '').splitlines()[-1][:160]})" if rec.get("error") else "")
                  + (": accuracy by round " + ", ".join(f"{r['val_accuracy']:.3f}" for r in rec["rounds"])
                     if rec["rounds"] else "") for rec in failed]
        lines.append("")
    return "\n".join(lines)


def plot(records: list[dict], out: Path) -> list[Path]:
    """One figure per (model, α): accuracy against rounds and against cumulative MB per client."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    chosen = headline(records)
    for model in dict.fromkeys(rec["run"]["model"] for rec in chosen):
        for alpha in dict.fromkeys(rec["run"]["alpha"] for rec in chosen if rec["run"]["model"] == model):
            rows = [rec for rec in chosen if rec["run"]["model"] == model and rec["run"]["alpha"] == alpha]
            fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
            for rec in sorted(rows, key=lambda r: list(METHODS).index(r["run"]["method"])):
                rounds = [r["round"] for r in rec["rounds"]]
                acc = [r.get("val_accuracy") for r in rec["rounds"]]
                cumulative, total = [], 0.0
                for r in rec["rounds"]:
                    total += bytes_per_client(r) / MB
                    cumulative.append(total)
                label = f"{METHODS[rec['run']['method']].label} (lr {rec['run']['lr']:g})"
                left.plot(rounds, acc, marker=".", label=label)
                right.plot(cumulative, acc, marker=".", label=label)
            left.set(xlabel="round", ylabel="validation accuracy (server, full model)")
            right.set(xlabel="MB moved per participating client (down + up, cumulative)", xscale="log")
            left.grid(alpha=0.3)
            right.grid(alpha=0.3)
            left.legend(fontsize=7)
            fig.suptitle(f"{TITLES[model]}, Dirichlet α = {alpha}")
            fig.tight_layout()
            path = out / f"federated_{model}_a{alpha}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def report(data: dict, docs: Path) -> None:
    """Plots, and the generated section of docs/federated.md, from the benchmark's JSON."""
    for rec in data["runs"]:
        rec["summary"] = summarize(rec)
    pngs = plot(data["runs"], docs)
    profiles = "".join(f"\n**Client work, {TITLES[m]}** (measured in one process, warm; {data['settings']['local_steps']} "
                       f"steps of batch {data['settings']['batch_size']})\n\n" + profile_table(p)
                       for m, p in data.get("compute_profile", {}).items())
    body = (("**Client data** (label partitions as the clients receive them)\n\n" + partition_table(data["partitions"])
             + "\n") if data.get("partitions") else "") + tables(data["runs"]) + profiles + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs)
    page = docs / "federated.md"
    if page.exists():
        write_section(page, "federated results", body)
    print(body)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", choices=sorted(GRIDS), default="headline")
    p.add_argument("--models", default=None, help="comma-separated subset of the grid's models")
    p.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--lrs", default=None, help="comma-separated learning rates (overrides the grid's)")
    p.add_argument("--alphas", default=None, help="comma-separated α values for every model (overrides the grid's)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a Run field for every run, e.g. --set rounds=10 --set clients=32")
    p.add_argument("--work", type=Path, default=Path("/tmp/istfx_federated"), help="per-run JSONL and logs")
    p.add_argument("--out", type=Path, default=DOCS, help="where federated.json and the plots go")
    p.add_argument("--jobs", type=int, default=1, help="federations running at once (default: 1)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    p.add_argument("--fresh", action="store_true", help="drop the runs already in OUT/federated.json")
    p.add_argument("--queue", default=None, metavar="MODEL/METHOD/ALPHA/LR,...",
                   help="run exactly these runs in this order (the grid's other settings); --collect reports them")
    p.add_argument("--collect", action="store_true",
                   help="write OUT/federated.json from every complete run in WORK, then the report")
    p.add_argument("--report", action="store_true", help="only redo tables and plots from OUT/federated.json")
    args = p.parse_args(argv)
    json_path = args.out / "federated.json"
    if args.report:
        report(json.loads(json_path.read_text()), args.out)
        return
    if args.collect:  # every complete run in the work folder, e.g. of several invocations run side by side
        runs = [Run.from_key(path.stem) for path in sorted(args.work.glob("*.jsonl"))]
        records = [execute(run, args.work, args.timeout, start=False) for run in runs]
        for rec in records:
            rec["summary"] = summarize(rec)
        models = tuple(dict.fromkeys(run.model for run in runs))
        alphas = {m: tuple(dict.fromkeys(run.alpha for run in runs if run.model == m)) for m in models}
        first = runs[0]
        data = {"grid": "collected", "partitions": partitions(models, alphas, first.clients, first.seed),
                "compute_profile": {m: compute_profile(m, first.local_steps, first.batch_size, first.subnets)
                                    for m in models if m != "gpt"},
                "methods": {m.name: {"label": m.label, "args": list(m.args)} for m in METHODS.values()},
                "settings": asdict(runs[0]) | {"tune_alpha": TUNE_ALPHA},
                "python": sys.version.split()[0], "runs": records}
        json_path.write_text(json.dumps(data, indent=1) + "\n")
        report(data, args.out)
        return
    grid = GRIDS[args.grid]()
    if args.queue:  # explicit runs, in this order, with the grid's other settings; then --collect
        runs = []
        for item in args.queue.split(","):
            model, method, alpha, lr = item.split("/")
            if model not in MODELS or method not in METHODS:
                p.error(f"--queue {item}: expected MODEL/METHOD/ALPHA/LR with MODEL in {list(MODELS)} and "
                        f"METHOD in {list(METHODS)}")
            runs.append(Run(model, method, alpha, float(lr), **grid.base))
        args.work.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda run: execute(run, args.work, args.timeout), runs))
        return
    if args.models:
        grid.models = tuple(m for m in args.models.split(",") if m in grid.models)
    if args.methods:
        grid.methods = tuple(m for m in args.methods.split(",") if m in METHODS)
    if args.lrs:
        grid.lrs = tuple(float(v) for v in args.lrs.split(","))
    if args.alphas:
        alphas = tuple(args.alphas.split(","))
        grid.alphas = {model: alphas for model in grid.models}
        grid.tune_alpha = grid.tune_alpha if grid.tune_alpha in alphas else alphas[0]
        # every α given is run at every learning rate given when the tuning α is not among them
    types = {name: type(value) for name, value in asdict(Run("mlp", "ist", "0.5", 0.1)).items()}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in types or name in ("model", "method", "alpha", "lr"):
            p.error(f"--set {item}: FIELD must be one of {', '.join(sorted(set(types) - {'model', 'method', 'alpha', 'lr'}))}")
        grid.base[name] = types[name](value)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    def execute_all(runs: list[Run]) -> list[dict]:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            records = list(pool.map(lambda run: execute(run, args.work, args.timeout), runs))
        for rec in records:
            rec["summary"] = summarize(rec)
        return records

    records = execute_all(grid.tuning_runs())
    for rec in records:
        rec["tuning"] = True
    records += execute_all(grid.other_runs(choose(records)))
    if json_path.exists() and not args.fresh:  # keep other grids' runs; this grid's runs replace theirs
        keys = {Run(**rec["run"]).key for rec in records}
        kept = [rec for rec in json.loads(json_path.read_text())["runs"] if Run(**rec["run"]).key not in keys]
        records = kept + records
    settings = asdict(grid.tuning_runs()[0])
    summaries = partitions(grid.models, grid.alphas, settings["clients"], settings["seed"])
    if json_path.exists() and not args.fresh:
        summaries = json.loads(json_path.read_text()).get("partitions", {}) | summaries
    data = {"grid": args.grid, "partitions": summaries, "methods": {m.name: {"label": m.label, "args": list(m.args)} for m in METHODS.values()},
            "settings": settings | {"lrs": list(grid.lrs), "tune_alpha": grid.tune_alpha},
            "python": sys.version.split()[0], "runs": records}
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    report(data, args.out)


if __name__ == "__main__":
    main()
