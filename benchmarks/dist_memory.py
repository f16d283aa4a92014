"""Peak memory per rank and bytes per round: IST (ps, sharded) against DDP and local SGD.

Trains the same wide MLP (64 -> W -> W -> 10, IST's BatchNorm MLP) on
scikit-learn's digits with 4 processes on this machine (gloo on 127.0.0.1,
one thread each), for the same samples: an IST round is S subnets x L local
steps x batch B; DDP takes L steps of S ranks x B; local SGD takes L local
steps of batch B on each rank, then averages the model. Plain SGD (no
momentum) everywhere, so no optimizer state.

- IST: ``python -m istfx.cli.train --topology ps|sharded`` ranks, as
  ``istfx train`` starts them (the initial state is written once by this
  script, as the ``istfx train`` launcher does, and the ranks read their rows
  of it). The model file has no evaluation set, so nothing gathers the full
  model for evaluation; IST peaks are those the ranks report in the last
  round, before the sharded job gathers the trained model onto rank 0.
- DDP: ``DistributedDataParallel(gradient_as_bucket_view=True)``, its leanest
  setting (the gradients live in the all-reduce buckets, no second copy kept).
- local SGD: each rank trains its own copy, then one all-reduce per round.

For every rank it reports the peak resident memory (``VmHWM``); for IST the
bytes each rank sent per round as counted by the backend; for DDP the bytes
of the gradient buckets its communication hook all-reduced, and for local
SGD of the tensors averaged, each at ring all-reduce cost
(``2 (S-1)/S x bytes`` per rank). A run at width 64 gives each method's fixed
cost (interpreter, torch, gloo, compiled graphs), subtracted in the "model
memory" columns.

    python benchmarks/dist_memory.py                 # W = 8192, 4 ranks: docs/dist_memory.json and its tables
                                                     # in docs/benchmarks_scale.md (~5-9 min on 2 busy cores)
    python benchmarks/dist_memory.py --quick         # sharded and DDP, W = 2048, prints only (~2-3 min)
    python benchmarks/dist_memory.py --width 4096 --json out.json

``MALLOC_MMAP_THRESHOLD_`` is fixed for every rank so that freed buffers go
back to the system and resident memory measures what is live.

:func:`run_job` (one job's ranks, optionally each under a kernel-enforced
memory cap from :mod:`memcap`) is what ``benchmarks/scale.py`` builds on.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MB = 2 ** 20
IST_TOPOLOGIES = ("ps", "sharded")
METHODS = ("ps", "sharded", "ddp", "local_sgd")

MODEL = '''
import torch
from istfx.models import ISTMLP

WIDTH = {width}


def build_model():
    return ISTMLP(64, [WIDTH, WIDTH], 10)


example_inputs = (torch.randn(8, 64),)


def train_data():  # no eval_data(): nothing gathers the full model after the last round
    from istfx.runtime.data import digits

    return digits(seed=0)[0]
'''

ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
RESULT = "BASELINE-RESULT "


@dataclass
class Settings:
    """What every job of a comparison shares."""

    rounds: int = 3
    local_steps: int = 2
    batch_size: int = 32
    timeout: float = 600.0  # seconds a whole job may take


@dataclass
class JobResult:
    """One job's outcome: per-rank exit codes, whether a cap killed a rank, and what rank 0 measured."""

    method: str
    width: int
    world: int
    codes: list[int]
    oom_killed: bool = False
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)
    error: str = ""
    charged_mb: list[float | None] = field(default_factory=list)  # peak each rank's cgroup charged (capped runs)
    rounds_completed: int = 0  # IST: rounds every rank finished (rank 0's metrics lines)

    @property
    def ok(self) -> bool:
        return not self.oom_killed and all(c == 0 for c in self.codes)


def mlp_split_bytes(width: int, subnets: int) -> tuple[int, int]:
    """(bytes of the split parameters of the wide MLP, bytes one subnet holds of them), float32.

    ``ISTMLP(64, [W, W], 10)`` has no Linear biases and no running statistics:
    every parameter is split (both hidden weights along their neurons, the
    BatchNorm scales and shifts, the head's columns). A subnet of W/S neurons
    holds W/S x 64, (W/S)^2, 10 x W/S and 4 x W/S of them.
    """
    full = 4 * (width * 64 + width * width + 10 * width + 4 * width)
    part = width // subnets
    return full, 4 * (part * 64 + part * part + 10 * part + 4 * part)


# -- baseline workers (run as: dist_memory.py --worker ddp|local_sgd ...) ------------------------------
def _peak_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
    return float("nan")


def baseline_worker(args: argparse.Namespace) -> None:
    """One rank of DDP or local SGD; rank 0 prints a JSON line with every rank's peak and the bytes moved."""
    import datetime

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from istfx.runtime.data import ShardBatches
    from istfx.runtime.comm import ring_allreduce_bytes
    from istfx.runtime.data import digits
    from istfx.models import ISTMLP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = ISTMLP(64, [args.width, args.width], 10)
    counted = [0]  # bytes of the tensors all-reduced, summed over the run
    if args.worker == "ddp":
        model = DistributedDataParallel(model, gradient_as_bucket_view=True)

        def count_and_reduce(state, bucket):
            buffer = bucket.buffer()
            counted[0] += buffer.numel() * buffer.element_size()
            return dist.all_reduce(buffer.div_(world), async_op=True).get_future().then(lambda f: f.value()[0])

        model.register_comm_hook(None, count_and_reduce)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    # DDP: every step sees S ranks x B samples; local SGD: every rank L steps of B, as an IST round.
    shard = ShardBatches(digits(seed=0)[0], rank, world, args.batch_size, seed=0)
    batches = (batch for _ in iter(int, 1) for batch in shard)  # epoch after epoch, reshuffled
    start = time.perf_counter()
    for _ in range(args.rounds):
        for _ in range(args.local_steps):
            x, y = next(batches)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=args.worker != "ddp")
            loss.backward()
            optimizer.step()
        if args.worker == "local_sgd":
            with torch.no_grad():  # in place, tensor by tensor: no second copy of the model
                for tensor in [*model.parameters(), *model.buffers()]:
                    if tensor.is_floating_point():
                        dist.all_reduce(tensor)
                        tensor.div_(world)
                        counted[0] += tensor.numel() * tensor.element_size()
    seconds = time.perf_counter() - start
    peak = torch.tensor([_peak_mb()], dtype=torch.float64)
    peaks = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(peaks, peak)
    if rank == 0:
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        print(RESULT + json.dumps({
            "rss_peak_mb": [float(p) for p in peaks], "parameter_bytes": params,
            "allreduced_bytes_per_round": counted[0] / args.rounds,
            "bytes_per_round": ring_allreduce_bytes(counted[0] / args.rounds, world),
            "seconds_per_round": seconds / args.rounds}), flush=True)
    dist.destroy_process_group()


# -- running a job's ranks ---------------------------------------------------------------------------
def _run_ranks(commands: list[list[str]], world: int, timeout: float, caps=None, cap_bytes: int | None = None
               ) -> tuple[list[int], bool, list[str], float, list[float | None]]:
    """Start one process per rank (each in its own memory cap when `caps` is given).

    When a rank fails the others get a few seconds to notice, then are
    killed (they are this script's children). Returns (exit codes, whether a
    cap OOM-killed a process, stdout of each rank, seconds, peak memory each
    cap charged in MiB: anonymous memory and page cache, None without caps).
    """
    from istfx.runtime.launch import free_port, rank_env

    port, run_id = free_port(), uuid.uuid4().hex[:12]  # one run id: the ranks' store keys carry it
    limits = [caps.new(cap_bytes) for _ in range(world)] if caps is not None else [None] * world
    procs: list[subprocess.Popen] = []
    outputs = [tempfile.TemporaryFile(mode="w+") for _ in range(world)]
    start = time.perf_counter()
    try:
        for rank in range(world):
            env = {**os.environ, **ENV, **rank_env(rank, world, port, run_id=run_id)}
            command = commands[rank] if limits[rank] is None else limits[rank].wrap(commands[rank])
            procs.append(subprocess.Popen(command, env=env, stdout=outputs[rank], stderr=subprocess.STDOUT,
                                          cwd=ROOT))
        deadline = start + timeout
        failed_at = None
        while any(p.poll() is None for p in procs):
            time.sleep(0.05)
            now = time.perf_counter()
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = now
            if now > deadline or (failed_at is not None and now - failed_at > 5.0):
                for p in procs:
                    if p.poll() is None:
                        p.kill()
        codes = [p.wait() for p in procs]
        seconds = time.perf_counter() - start
        oom = any(cap.oom_kills() > 0 for cap in limits if cap is not None)
        charged = [cap.peak_bytes() / MB if cap is not None and cap.peak_bytes() is not None else None
                   for cap in limits]
        texts = []
        for handle in outputs:
            handle.seek(0)
            texts.append(handle.read())
        return codes, oom, texts, seconds, charged
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for handle in outputs:
            handle.close()
        for cap in limits:
            if cap is not None:
                caps.discard(cap)


def write_initial_state(model_file: Path, out: Path) -> None:
    """The model's initial state, seeded as ``istfx train`` seeds it, written in a child process.

    A child, so that this script never holds a large model itself.
    """
    code = ("import sys, torch\n"
            "from istfx.cli.loader import load_model_file\n"
            "from istfx.runtime.checkpoint import atomic_save\n"
            "torch.manual_seed(0)\n"
            "model = load_model_file(sys.argv[1]).model\n"
            "atomic_save(dict(model.state_dict()), sys.argv[2])\n")
    subprocess.run([sys.executable, "-c", code, str(model_file), str(out)], check=True, cwd=ROOT,
                   env={**os.environ, **ENV})


def run_job(method: str, width: int, world: int, settings: Settings, folder: Path, caps=None,
            cap_bytes: int | None = None, extra_args: tuple[str, ...] = ()) -> JobResult:
    """Train the wide MLP at `width` with `method` on `world` ranks; optionally cap each rank's memory.

    `method` is ``"ps"``, ``"sharded"`` (IST, one subnet per rank), ``"ddp"`` or ``"local_sgd"``;
    `extra_args` go to the IST ranks' ``istfx train`` (e.g. ``--save``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method in IST_TOPOLOGIES:
        model = folder / f"wide_{width}.py"
        model.write_text(MODEL.format(width=width), encoding="utf-8")
        init = folder / f"init_{width}.safetensors"
        if not init.exists():
            write_initial_state(model, init)
        metrics = folder / f"{method}_{width}_{world}.jsonl"
        metrics.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "istfx.cli.train", str(model), "--subnets", str(world), "--backend", "torch",
                "--topology", method, "--rounds", str(settings.rounds), "--local-steps", str(settings.local_steps),
                "--batch-size", str(settings.batch_size), "--lr", "0.01", "--momentum", "0", "--threads", "1",
                "--eval-every", str(10 ** 6), "--quiet", "--metrics", str(metrics), "--init-from", str(init),
                "--timeout", str(int(settings.timeout)), "--round-timeout", str(int(settings.timeout)),
                "--heartbeat-timeout", "0", *extra_args]
        commands = [argv] * world
    else:
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--width", str(width),
                "--rounds", str(settings.rounds), "--local-steps", str(settings.local_steps),
                "--batch-size", str(settings.batch_size), "--timeout", str(int(settings.timeout))]
        commands = [argv] * world
    codes, oom, texts, seconds, charged = _run_ranks(commands, world, settings.timeout, caps, cap_bytes)
    result = JobResult(method, width, world, codes, oom, seconds, charged_mb=charged)
    if method in IST_TOPOLOGIES and metrics.exists():
        # Rank 0 writes a round's line once every rank finished it: what was trained before any failure.
        rows = [line for line in metrics.read_text().splitlines() if line.strip()]
        result.rounds_completed = len(rows)
        if len(rows) == settings.rounds:
            result.metrics = _ist_metrics(metrics, world)
    if not result.ok:
        result.error = "OOM-killed" if oom else f"exit codes {codes}: {texts[0][-600:] or texts[-1][-600:]}"
        return result
    if method not in IST_TOPOLOGIES:
        result.rounds_completed = settings.rounds
        line = next(line for line in texts[0].splitlines() if line.startswith(RESULT))
        result.metrics = json.loads(line[len(RESULT):])
    return result


def _ist_metrics(path: Path, world: int) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    last = rows[-1]
    steady = rows[1:] or rows  # round 0 has no exchange (sharded) / the same sends (ps)
    out = {
        "rss_peak_mb": last["rss_peak_mb"],
        "bytes_sent_per_round": [sum(r["bytes_sent"][k] for r in steady) / len(steady) for k in range(world)],
        "bytes_received_per_round": [sum(r["bytes_received"][k] for r in steady) / len(steady)
                                     for k in range(world)],
        "ddp_bytes_per_round_estimate": last["ddp_bytes_per_rank"],
        "local_sgd_bytes_per_round_estimate": last["local_sgd_bytes_per_rank"],
        "parameter_bytes": last["model_parameter_bytes"],
        "subnet_bytes": max(last["bytes_per_subnet"]),
        "parameters_per_subnet": max(last["parameters_per_subnet"]),
        "seconds_per_round": sum(r["seconds"] for r in steady) / len(steady),
    }
    if last.get("state_bytes") is not None:
        out["state_bytes"] = last["state_bytes"]
    return out


# -- the comparison ------------------------------------------------------------------------------------
def compare(width: int, nproc: int, settings: Settings, methods=METHODS, log=print) -> dict:
    """Each method at `width` and at width 64 (fixed costs); the numbers of docs/dist_memory.json."""
    results: dict = {"width": width, "nproc": nproc, "methods": list(methods), "rounds": settings.rounds,
                     "local_steps": settings.local_steps, "batch_size": settings.batch_size,
                     "load_average_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="istfx-bench-") as tmp:
        for w in (64, width):
            for method in methods:
                job = run_job(method, w, nproc, settings, Path(tmp))
                if not job.ok:
                    raise RuntimeError(f"{method} at width {w} failed: {job.error}")
                log(f"  {method:>9} W={w}: {job.seconds:5.1f}s, peak RSS per rank "
                    f"{' '.join(f'{v:.0f}' for v in job.metrics['rss_peak_mb'])} MiB")
                results[f"{method}@{w}"] = job.metrics
    results["load_average_end"] = os.getloadavg()[0]
    full, sub = mlp_split_bytes(width, nproc)
    results["parameter_mb"] = full / MB  # every parameter is split
    results["split_parameter_mb"] = full / MB
    results["one_subnet_split_mb"] = sub / MB
    if "sharded" in methods:
        sharded = results[f"sharded@{width}"]
        results["sharded_state_fraction_of_split"] = max(sharded["state_bytes"]) / full
        # What the backend documents: 1/S of tensors cut along one axis, 1/S + 1/S^2 of the W x W weight.
        square = 4 * width * width
        results["sharded_state_expected_fraction"] = \
            ((full - square) / nproc + square * (1 / nproc + 1 / nproc ** 2)) / full
    for method in methods:
        big, small = results[f"{method}@{width}"]["rss_peak_mb"], results[f"{method}@64"]["rss_peak_mb"]
        results[f"{method}_model_memory_mb"] = [b - s for b, s in zip(big, small)]
    return results


def report(results: dict) -> str:
    """The text table of a :func:`compare` result."""
    width, nproc, methods = results["width"], results["nproc"], results["methods"]
    lines = [
        f"wide MLP 64-{width}-{width}-10 ({results['parameter_mb']:.1f} MiB of float32 parameters), {nproc} ranks "
        f"(gloo, 1 thread each), {results['rounds']} rounds x {results['local_steps']} local steps, batch "
        f"{results['batch_size']} per rank; load average {results['load_average_start']:.1f} -> "
        f"{results['load_average_end']:.1f} on {os.cpu_count()} cores",
        f"split parameters {results['split_parameter_mb']:.1f} MiB; 1/S of them "
        f"{results['split_parameter_mb'] / nproc:.1f} MiB; one subnet's share {results['one_subnet_split_mb']:.1f} MiB",
        "",
        f"{'method':<10} {'peak RSS per rank (MiB)':<34} {'minus the W=64 run (MiB)':<34} model memory / parameters",
    ]
    total = results["parameter_mb"]
    for method in methods:
        big = results[f"{method}@{width}"]["rss_peak_mb"]
        model = results[f"{method}_model_memory_mb"]
        lines.append(f"{method:<10} {' '.join(f'{v:7.0f}' for v in big):<34} "
                     f"{' '.join(f'{v:7.0f}' for v in model):<34} "
                     f"{' '.join(f'{v / total:5.2f}' for v in model)}")
    sharded = results.get(f"sharded@{width}")
    if sharded:
        lines.append(
            f"sharded: state kept between rounds per rank (slices + homes + shared): "
            f"{' '.join(f'{b / MB:.1f}' for b in sharded['state_bytes'])} MiB = "
            f"{results['sharded_state_fraction_of_split']:.3f} of the split parameters "
            f"(expected {results['sharded_state_expected_fraction']:.3f}: 1/S, and 1/S + 1/S^2 of the W x W weight)")
    lines += ["", "bytes per round per rank (sent; received), same samples per round:"]
    for method in [m for m in IST_TOPOLOGIES if m in methods]:
        r = results[f"{method}@{width}"]
        lines.append(f"  IST {method:<9}: {' '.join(f'{v / MB:8.2f}' for v in r['bytes_sent_per_round'])} ;"
                     f" {' '.join(f'{v / MB:8.2f}' for v in r['bytes_received_per_round'])} MiB")
    for method, label in [(m, label) for m, label in (("ddp", "DDP"), ("local_sgd", "local SGD")) if m in methods]:
        r = results[f"{method}@{width}"]
        lines.append(f"  {label:<13}: {r['bytes_per_round'] / MB:8.2f} MiB each way per rank (ring all-reduce of "
                     f"{r['allreduced_bytes_per_round'] / MB:.1f} MiB per round, counted in the run)")
    if sharded:
        busiest = max(sharded["bytes_sent_per_round"])
        lines.append("  " + "; ".join(f"{label} / IST sharded (busiest rank): "
                                      f"{results[f'{m}@{width}']['bytes_per_round'] / busiest:.1f}x"
                                      for m, label in (("ddp", "DDP"), ("local_sgd", "local SGD")) if m in methods))
    lines.append("seconds per round: " + ", ".join(
        f"{m} {results[f'{m}@{width}']['seconds_per_round']:.2f}" for m in methods))
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """The tables of docs/benchmarks_scale.md for a :func:`compare` result."""
    width, nproc, methods = results["width"], results["nproc"], results["methods"]
    names = {"ps": "IST ps", "sharded": "IST sharded", "ddp": "DDP", "local_sgd": "local SGD"}
    total = results["parameter_mb"]
    lines = [
        f"Wide MLP 64-{width}-{width}-10 ({total:.1f} MiB of float32 parameters, every one split), {nproc} "
        f"processes (gloo, one thread each), {results['rounds']} rounds x {results['local_steps']} local steps, "
        f"batch {results['batch_size']} per process; load average {results['load_average_start']:.1f} -> "
        f"{results['load_average_end']:.1f} on {os.cpu_count()} cores. Model memory = peak RSS minus the same "
        "method's peak at W = 64.",
        "",
        "| method | peak RSS per rank MiB | model memory per rank MiB | model memory / parameters |",
        "| --- | --- | --- | --- |",
    ]
    for m in methods:
        big, model = results[f"{m}@{width}"]["rss_peak_mb"], results[f"{m}_model_memory_mb"]
        lines.append(f"| {names[m]} | {' / '.join(f'{v:.0f}' for v in big)} | {' / '.join(f'{v:.0f}' for v in model)} "
                     f"| {' / '.join(f'{v / total:.2f}' for v in model)} |")
    if "sharded" in methods:
        state = results[f"sharded@{width}"]["state_bytes"]
        lines += ["", f"IST sharded keeps {max(state) / MB:.1f} MiB per rank between rounds (its slices, its share of "
                      f"the idle elements, the shared tensors): {results['sharded_state_fraction_of_split']:.3f} of the "
                      f"split parameters, as the backend's layout predicts "
                      f"({results['sharded_state_expected_fraction']:.3f}: 1/S of every tensor cut along one axis, "
                      f"1/S + 1/S^2 of the W x W weight)."]
    lines += ["", "| method | bytes sent per round per rank MiB | received MiB | how counted |", "| --- | --- | --- | --- |"]
    for m in [m for m in IST_TOPOLOGIES if m in methods]:
        r = results[f"{m}@{width}"]
        lines.append(f"| {names[m]} | {' / '.join(f'{v / MB:.2f}' for v in r['bytes_sent_per_round'])} "
                     f"| {' / '.join(f'{v / MB:.2f}' for v in r['bytes_received_per_round'])} | by the backend "
                     f"({'point-to-point messages' if m == 'ps' else 'all-to-all measured, shared all-reduce at ring cost'}) |")
    for m in [m for m in ("ddp", "local_sgd") if m in methods]:
        r = results[f"{m}@{width}"]
        what = "gradient buckets through a comm hook" if m == "ddp" else "tensors averaged"
        lines.append(f"| {names[m]} | {r['bytes_per_round'] / MB:.2f} (every rank) | {r['bytes_per_round'] / MB:.2f} "
                     f"| {r['allreduced_bytes_per_round'] / MB:.1f} MiB of {what} per round, at ring cost |")
    return "\n".join(lines)


def interrupt_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the ``finally`` blocks stop this script's ranks."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=None, help="hidden width (default 8192; 2048 with --quick)")
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="IST sharded and DDP only, W = 2048, 2 rounds; writes no file unless --json")
    parser.add_argument("--json", default=None,
                        help="write the numbers here (default: docs/dist_memory.json, none with --quick)")
    parser.add_argument("--worker", choices=("ddp", "local_sgd"), help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=600.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        baseline_worker(args)
        return
    interrupt_on_sigterm()
    width = args.width or (2048 if args.quick else 8192)
    settings = Settings(rounds=2 if args.quick else args.rounds, local_steps=args.local_steps,
                        batch_size=args.batch_size, timeout=args.timeout)
    methods = ("sharded", "ddp") if args.quick else METHODS
    results = compare(width, args.nproc, settings, methods, log=lambda text: print(text, file=sys.stderr, flush=True))
    print(report(results))
    out = args.json or (None if args.quick else str(ROOT / "docs" / "dist_memory.json"))
    if out:
        Path(out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    if not args.quick and not args.json:
        from mdsection import write_section

        write_section(ROOT / "docs" / "benchmarks_scale.md", "dist_memory", markdown(results))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("dist_memory.py: interrupted; its ranks were stopped", file=sys.stderr)
        raise SystemExit(130) from None
