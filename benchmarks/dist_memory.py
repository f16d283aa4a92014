"""Peak memory per rank and bytes per round: IST (ps, sharded) against DDP and local SGD.

Trains the same wide MLP (64 -> W -> W -> 10, IST's BatchNorm MLP) on
scikit-learn's digits with 4 processes on this machine (gloo on 127.0.0.1):

- ``istfx train --topology ps`` and ``--topology sharded`` (one subnet per rank);
- torch DDP, the same model, the same samples (one DDP step per IST local step:
  S ranks x batch B each, as an IST round's S subnets x B).

For every rank it reports the peak resident memory (VmHWM) and, for IST, the
bytes each rank sent and received per round (measured); for DDP and local
SGD the bytes a ring all-reduce moves for the same samples. A run at width
64 gives each method's fixed cost (interpreter, torch, gloo, compiled
graphs), subtracted in the "model memory" columns.

    python benchmarks/dist_memory.py                    # W = 8192, 4 ranks (a few minutes on 2 cores)
    python benchmarks/dist_memory.py --width 4096 --json out.json

``MALLOC_MMAP_THRESHOLD_`` is fixed for every rank so that freed buffers go
back to the system and resident memory measures what is live.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = '''
import torch
from istfx.models import ISTMLP

WIDTH = {width}


def build_model():
    return ISTMLP(64, [WIDTH, WIDTH], 10)


example_inputs = (torch.randn(8, 64),)
'''

ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}


def _peak_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
    return float("nan")


# -- DDP worker (run as: dist_memory.py --ddp-worker ...) ---------------------------------------------
def ddp_worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from istfx.cli_train import ShardBatches
    from istfx.data import digits
    from istfx.models import ISTMLP

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DistributedDataParallel(ISTMLP(64, [args.width, args.width], 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = iter(ShardBatches(digits(seed=0)[0], rank, world, args.batch_size, seed=0))
    start = time.perf_counter()
    for _ in range(args.rounds * args.local_steps):
        x, y = next(batches)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    peak = torch.tensor([_peak_mb()], dtype=torch.float64)
    peaks = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(peaks, peak)
    if rank == 0:
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        print("DDP-RESULT " + json.dumps({"rss_peak_mb": [float(p) for p in peaks], "parameter_bytes": params,
                                         "seconds": time.perf_counter() - start}), flush=True)
    dist.destroy_process_group()


def run_ddp(args: argparse.Namespace, width: int) -> dict:
    from istfx.launch import free_port, rank_env

    port = free_port()
    command = [sys.executable, __file__, "--ddp-worker", "--width", str(width), "--rounds", str(args.rounds),
               "--local-steps", str(args.local_steps), "--batch-size", str(args.batch_size)]
    procs = [subprocess.Popen(command, env={**os.environ, **ENV, **rank_env(r, args.nproc, port)},
                              stdout=subprocess.PIPE, text=True) for r in range(args.nproc)]
    out = procs[0].communicate()[0]
    for proc in procs[1:]:
        proc.wait()
    line = next(line for line in out.splitlines() if line.startswith("DDP-RESULT "))
    return json.loads(line[len("DDP-RESULT "):])


def run_ist(args: argparse.Namespace, width: int, topology: str, folder: Path) -> dict:
    model = folder / f"wide_{width}.py"
    model.write_text(MODEL.format(width=width), encoding="utf-8")
    metrics = folder / f"{topology}_{width}.jsonl"
    command = [sys.executable, "-m", "istfx.cli_train", str(model), "--subnets", str(args.nproc),
               "--topology", topology, "--rounds", str(args.rounds), "--local-steps", str(args.local_steps),
               "--batch-size", str(args.batch_size), "--lr", "0.01", "--momentum", "0", "--threads", "1",
               "--eval-every", str(10 ** 6), "--quiet", "--metrics", str(metrics)]
    subprocess.run(command, check=True, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    last = rows[-1]  # recorded during the round, before the final evaluation gathers the model
    steady = rows[1:-1] or rows[1:] or rows  # round 0 has no exchange; the last one ends with the evaluation
    world = args.nproc
    return {
        "rss_peak_mb": last["rss_peak_mb"],
        "state_bytes": last.get("state_bytes"),
        "bytes_sent_per_round": [sum(r["bytes_sent"][k] for r in steady) / len(steady) for k in range(world)],
        "bytes_received_per_round": [sum(r["bytes_received"][k] for r in steady) / len(steady) for k in range(world)],
        "ddp_bytes_per_round": last["ddp_bytes_per_rank"],
        "local_sgd_bytes_per_round": last["local_sgd_bytes_per_rank"],
        "parameter_bytes": last["model_parameter_bytes"],
        "subnet_bytes": max(last["bytes_per_subnet"]),
        "seconds_per_round": sum(r["seconds"] for r in steady) / len(steady),
    }


def split_bytes(width: int, subnets: int) -> tuple[int, int]:
    """(bytes of the split parameters, bytes one subnet holds of them), float32."""
    full = 4 * (width * 64 + width * width + 10 * width + 4 * width)
    part = width // subnets
    sub = 4 * (part * 64 + part * part + 10 * part + 4 * part)
    return full, sub


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_worker:
        ddp_worker(args)
        return
    results: dict = {"width": args.width, "nproc": args.nproc, "rounds": args.rounds,
                     "local_steps": args.local_steps, "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory(prefix="istfx-bench-") as tmp:
        folder = Path(tmp)
        for width in (64, args.width):
            for topology in ("ps", "sharded"):
                results[f"{topology}@{width}"] = run_ist(args, width, topology, folder)
            results[f"ddp@{width}"] = run_ddp(args, width)
    full, sub = split_bytes(args.width, args.nproc)
    results["split_parameter_mb"] = full / 2 ** 20
    results["one_subnet_split_mb"] = sub / 2 ** 20
    mb = 2 ** 20
    print(f"wide MLP 64-{args.width}-{args.width}-10, {args.nproc} ranks (gloo, 1 thread each), "
          f"{args.rounds} rounds x {args.local_steps} local steps, batch {args.batch_size} per rank")
    print(f"split parameters {full / mb:.1f} MiB; 1/S of them {full / args.nproc / mb:.1f} MiB; "
          f"one subnet's share {sub / mb:.1f} MiB")
    print()
    print(f"{'method':<10} {'peak RSS per rank (MiB)':<36} {'minus the W=64 run (MiB)':<36}")
    for method in ("ddp", "ps", "sharded"):
        big = results[f"{method}@{args.width}"]["rss_peak_mb"]
        small = results[f"{method}@64"]["rss_peak_mb"]
        print(f"{method:<10} {' '.join(f'{v:7.0f}' for v in big):<36} "
              f"{' '.join(f'{b - s:7.0f}' for b, s in zip(big, small)):<36}")
    ps, sh = results[f"ps@{args.width}"], results[f"sharded@{args.width}"]
    print(f"sharded: state kept between rounds per rank (slices + homes + shared): "
          f"{' '.join(f'{b / mb:.1f}' for b in sh['state_bytes'])} MiB "
          f"({max(sh['state_bytes']) / full:.3f} of the split parameters)")
    print()
    print("bytes per round per rank (sent; received), same samples per round:")
    print(f"  IST ps       : {' '.join(f'{v / mb:8.2f}' for v in ps['bytes_sent_per_round'])} ;"
          f" {' '.join(f'{v / mb:8.2f}' for v in ps['bytes_received_per_round'])} MiB")
    print(f"  IST sharded  : {' '.join(f'{v / mb:8.2f}' for v in sh['bytes_sent_per_round'])} ;"
          f" {' '.join(f'{v / mb:8.2f}' for v in sh['bytes_received_per_round'])} MiB")
    print(f"  DDP          : {ps['ddp_bytes_per_round'] / mb:8.2f} MiB each way per rank "
          f"({args.local_steps} ring all-reduces of {ps['parameter_bytes'] / mb:.1f} MiB)")
    print(f"  local SGD    : {ps['local_sgd_bytes_per_round'] / mb:8.2f} MiB each way per rank (one all-reduce)")
    print(f"seconds per round: ps {ps['seconds_per_round']:.2f}, sharded {sh['seconds_per_round']:.2f}, "
          f"DDP {results[f'ddp@{args.width}']['seconds'] / args.rounds:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
