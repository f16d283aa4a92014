"""Time and bytes to accuracy: IST against DDP and local SGD, workers on emulated slow links.

Needs root: every worker runs in its own network namespace, joined to the
others through a switch by a link shaped with ``tc`` (``benchmarks/netem.py``;
the namespaces are removed on exit, on Ctrl-C/SIGTERM, and at the next start
should a run have been killed). ::

    sudo .venv/bin/python benchmarks/time_to_accuracy.py --quick                 # < 5 minutes
    sudo .venv/bin/python benchmarks/time_to_accuracy.py --model mlp --workers 2 4 --link 100mbit
    sudo .venv/bin/python benchmarks/time_to_accuracy.py --model gpt --workers 4 --link 100mbit
    .venv/bin/python benchmarks/time_to_accuracy.py --render                     # tables and plots again
    .venv/bin/python benchmarks/time_to_accuracy.py --compare A.json B.json       # speed-ups of repeats

For each setting (model, workers, link rate) the same model, from the same
initial weights, on the same per-worker batches, is trained by

- ``ddp``: ``torch.nn.parallel.DistributedDataParallel``;
- ``localsgd``: PyTorch's post-local SGD (``post_localSGD_hook`` with
  ``PostLocalSGDOptimizer`` + ``PeriodicModelAverager``), the model averaged
  every ``--local-steps`` steps;
- ``ist-ps`` and ``ist-sharded``: istfx IST on the torch backend, one
  subnet per worker, ``--local-steps`` steps per round;

each for ``--budget`` seconds of training on rank 0's clock (evaluation
excluded; see ``benchmarks/tta_worker.py``), one method after another. Every
rank has one thread (``OMP_NUM_THREADS=1``). Bytes are read from each
worker's interface counters (what went on the wire, headers included) and,
as a cross-check, from the switch ports and the methods' own accounting
(``istfx.runtime.comm`` formulas for DDP and local SGD, the backend's count for IST).

Writes ``tta_<model>_w<W>_<link>.json`` and ``.png`` under ``--out``
(default ``docs/benchmarks``; ``--quick``: a temporary folder) and, for full
runs, the tables into ``docs/benchmarks.md`` between markers.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import netem  # noqa: E402
import tta_report  # noqa: E402
from tta_worker import METHODS, add_task_arguments, fill_defaults  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
TARGETS = {"mlp": [0.90, 0.94, 0.96], "gpt": [2.8, 2.6, 2.4, 2.2]}
TITLES = {"mlp": "Wide MLP (4096 hidden) on augmented digits", "gpt": "Byte-level GPT on pydoc_data.topics"}
_PORTS = itertools.count(29500)  # a fresh rendezvous port per launch: no TIME_WAIT clashes
_TASK_FLAGS = ("model", "local_steps", "warmup_steps", "batch_size", "lr", "momentum", "hidden", "copies",
               "block_size", "n_layer", "n_head", "n_embd", "outer_lr", "outer_momentum", "seed", "budget", "points",
               "max_steps", "timeout")
LIGHTHOUSE = shutil.which("torchft_lighthouse") or str(Path(sys.executable).with_name("torchft_lighthouse"))


def _task_argv(args: argparse.Namespace) -> list[str]:
    argv = []
    for key in _TASK_FLAGS:
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return argv


def _merge(records: list[dict]) -> dict:
    """One run from the ranks' records: rank 0's clock and scores, every rank's bytes and CPU time."""
    records = sorted(records, key=lambda r: r["rank"])
    counts = {len(r["points"]) for r in records}
    if len(counts) != 1:
        raise RuntimeError(f"ranks recorded different numbers of evaluations: {sorted(counts)}")
    points = []
    for k, p in enumerate(records[0]["points"]):
        rows = [r["points"][k] for r in records]
        merged = {key: value for key, value in p.items() if key not in ("cpu_seconds", "link_rx", "link_tx",
                                                                         "app_sent")}
        merged.update({
            "rank_seconds": [row["train_seconds"] for row in rows],
            "cpu_seconds": [row["cpu_seconds"] for row in rows],
            "app_sent": [row["app_sent"] for row in rows],
            "link_tx": None if p["link_tx"] is None else [row["link_tx"] for row in rows],
            "link_rx": None if p["link_rx"] is None else [row["link_rx"] for row in rows],
        })
        points.append(merged)
    return {
        "points": points,
        "setup_seconds": max(r["setup_seconds"] for r in records),
        "eval_seconds": records[0]["eval_seconds"],
        "wall_seconds": max(r["wall_seconds"] for r in records),
        "method_info": records[0]["method_info"],
        "rss_base_mb": [r.get("rss_base_mb") for r in records],
        "rss_peak_mb": [r.get("rss_peak_mb") for r in records],
        "task_info": records[0]["task_info"],
    }


def run_method(net: netem.EmulatedNetwork, method: str, workers: int, args: argparse.Namespace,
               folder: Path, port: int) -> dict:
    """Train `method` on ranks 0..workers-1 of `net`; return the merged run (raises on a failed rank)."""
    from istfx.runtime.launch import rank_env

    out = folder / method
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run_id = uuid.uuid4().hex[:12]
    before = net.port_counters()
    procs, logs = [], []
    lighthouse = None
    if method == "diloco":  # torchft's lighthouse, in rank 0's namespace, as a DiLoCo job runs it
        log = open(out / "lighthouse.log", "w")
        logs.append(log)
        lighthouse = net.popen(0, [LIGHTHOUSE, "--min_replicas", str(workers), "--bind", f"0.0.0.0:{port + 1000}",
                                   "--join_timeout_ms", "60000", "--quorum_tick_ms", "10"],
                               stdout=log, stderr=subprocess.STDOUT)
    for rank in range(workers):
        env = dict(os.environ)
        env.update(rank_env(rank, workers, port, master_addr=net.address(0), threads=1, run_id=run_id))
        env.update({"GLOO_SOCKET_IFNAME": net.iface, "TORCH_CPP_LOG_LEVEL": "ERROR", "PYTHONUNBUFFERED": "1",
                    "ISTFX_TTA_ADDR": net.address(rank), "ISTFX_TTA_FT_PORT": str(port + 2000),
                    "TORCHFT_LIGHTHOUSE": f"http://{net.address(0)}:{port + 1000}", "RUST_LOG": "error"})
        log = open(out / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(net.popen(rank, [sys.executable, str(HERE / "tta_worker.py"), "--method", method,
                                      "--out-dir", str(out), *_task_argv(args)],
                               env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 4 * args.budget + 900
    try:
        while any(p.poll() is None for p in procs):
            failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if lighthouse is not None and lighthouse.poll() is None:
            lighthouse.terminate()
            lighthouse.wait(timeout=10)
        for log in logs:
            log.close()
    after = net.port_counters()
    codes = [p.returncode for p in procs]
    if any(codes):
        tail = (out / f"rank{next(r for r, c in enumerate(codes) if c)}.log").read_text()[-3000:]
        raise RuntimeError(f"{method}: ranks exited with {codes}:\n{tail}")
    run = _merge([json.loads((out / f"rank{r}.json").read_text()) for r in range(workers)])
    run["switch_ports"] = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before)]
    return run


def run_setting(net: netem.EmulatedNetwork, args: argparse.Namespace, workers: int, link: str,
                folder: Path) -> dict:
    """Every method of ``args.methods`` at one (workers, link) setting; the result record."""
    result = {
        "model": args.model, "title": TITLES[args.model], "workers": workers, "link": link,
        "link_measured": net.measure() if net.workers >= 2 else None,
        "metric": "accuracy" if args.model == "mlp" else "val_loss",
        "higher_is_better": args.model == "mlp", "targets": args.targets or TARGETS[args.model],
        "budget_seconds": args.budget, "task_args": {k: getattr(args, k) for k in _TASK_FLAGS},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_start": os.getloadavg()},
        "runs": {},
    }
    import torch

    result["torch"] = torch.__version__
    for method in args.methods:
        start = time.perf_counter()
        print(f"[{args.model} W={workers} {link}] {method} ...", flush=True)
        try:
            run = run_method(net, method, workers, args, folder, port=next(_PORTS))
        except RuntimeError as exc:
            print(f"  failed: {exc}", flush=True)
            result.setdefault("failed", {})[method] = str(exc)[-2000:]
            continue
        result["runs"][method] = run
        last = run["points"][-1]
        print(f"  {result['metric']} {last[result['metric']]:.4f} after {last['train_seconds']:.0f}s "
              f"({last['steps']} steps per worker, wall {time.perf_counter() - start:.0f}s)", flush=True)
    result["machine"]["loadavg_end"] = os.getloadavg()
    return result


def _name(result: dict) -> str:
    tag = f"{result['tag']}_" if result.get("tag") else ""
    return f"tta_{tag}{result['model']}_w{result['workers']}_{result['link']}"


def section(result: dict, command: str, image: str) -> str:
    """The markdown of one setting: how it was made, the tables, the plot."""
    info = next(iter(result["runs"].values()))["task_info"] if result["runs"] else {}
    measured = result.get("link_measured") or {}
    task = result["task_args"]
    lines = [
        f"#### {result['title']}, {result['workers']} workers, {result['link']} links",
        "",
        f"Command: `{command}`. {result['budget_seconds']:.0f} s of training per method; "
        f"{info.get('model', '')}, {info.get('optimizer', '')}, batch {info.get('batch_per_worker', '')} per worker, "
        f"{task['local_steps']} local steps per IST round / local SGD period. Link probe: "
        f"{measured.get('throughput_mbit', float('nan')):.0f} Mbit/s TCP, "
        f"round trip {measured.get('rtt_ms', float('nan')):.3f} ms. Load average "
        f"{result['machine']['loadavg_start'][0]:.1f} at the start, {result['machine']['loadavg_end'][0]:.1f} at "
        "the end (2 cores).",
        "",
    ]
    if "diloco" in result["runs"]:
        lines += [tta_report.race_markdown(result), "", *_goal_lines(result)]
    else:
        lines += ["Time (training seconds) and MB sent on all links until the target is first met:", "",
                  tta_report.markdown(result)]
    for method, error in (result.get("failed") or {}).items():
        lines += ["", f"{tta_report.LABELS[method]} failed: `{error.splitlines()[-1] if error else ''}`"]
    lines += ["", f"![{result['title']}, {result['workers']} workers]({image})", "",
              f"Raw curves: [`{Path(image).with_suffix('.json').name}`]({Path(image).with_suffix('.json')})."]
    return "\n".join(lines)


def _goal_lines(result: dict) -> list[str]:
    """The issue's goals for the best IST variant against DDP and DiLoCo, measured, as a list."""
    g = tta_report.goals(result)
    if not g:
        return []
    label = tta_report.LABELS[g["best"]]
    mark = {True: "met", False: "**not met**"}
    lines = [f"Goals, best IST variant by final score = {label}:", ""]
    if "quality" in g:
        q = g["quality"]
        lines.append(f"- final score within 2% of DDP's: {q['ist']:.3f} against {q['ddp']:.3f}, "
                     f"{q['gap']:+.1%}, negative = better than DDP ({mark[q['met']]})")
    cells = []
    for t in g["speed"]["targets"]:
        if t["ratio"] is not None:
            text = f"{t['ratio']:.2f}x"
        elif t["ist"] is not None:
            text = f"IST only ({t['ist']:.0f} s; DiLoCo never)"
        else:
            text = "neither"
        cells.append(f"{t['target']:g}: {text}")
    lines.append(f"- targets at least 1.5x sooner than DiLoCo: {'; '.join(cells)} ({mark[g['speed']['met']]})")
    b = g["bytes"]
    lines.append(f"- at most 1/S of DiLoCo's bytes per round: {b['ist'] / 1e6:.2f} MB against "
                 f"{b['diloco'] / 1e6:.2f} MB per worker, {b['ratio']:.2f}x ({mark[b['met']]})")
    if "memory" in g:
        m = g["memory"]
        above = "" if m["ratio_above"] is None else (f"; above the start {m['ist_above']:.0f} MB against "
                                                     f"{m['diloco_above']:.0f} MB, {m['ratio_above']:.2f}x")
        lines.append(f"- at most 0.5x DiLoCo's peak memory per worker: {m['ist']:.0f} MB against "
                     f"{m['diloco']:.0f} MB, {m['ratio']:.2f}x{above} ({mark[m['met']]})")
    return lines


def write_section(doc: Path, key: str, text: str) -> None:
    """Replace the text between ``<!-- tta:KEY:begin -->`` and ``:end -->`` in `doc` (appended if absent)."""
    begin, end = f"<!-- tta:{key}:begin -->", f"<!-- tta:{key}:end -->"
    body = doc.read_text() if doc.exists() else ""
    if begin not in body:
        body = body.rstrip("\n") + f"\n\n{begin}\n{end}\n"
    head, rest = body.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def publish(result: dict, out: Path, doc: Path | None) -> None:
    """Write the JSON and the plot under `out`; the section into `doc` when given."""
    out.mkdir(parents=True, exist_ok=True)
    name = _name(result)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    tta_report.plot(result, out / f"{name}.png")
    if doc is not None:
        image = os.path.relpath(out / f"{name}.png", doc.parent)
        write_section(doc, name.removeprefix("tta_"), section(result, result["command"], image))
    print(section(result, result["command"], str(out / f"{name}.png")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] + " Needs root (network namespaces, tc).")
    parser.add_argument("--quick", action="store_true",
                        help="MLP, 2 workers, 100mbit, 20 s per method, a smaller data set: under 5 minutes")
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--link", nargs="+", default=["100mbit"], help="link rates, e.g. 100mbit 1gbit")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--targets", type=float, nargs="+", default=None,
                        help="accuracy (mlp) or validation loss (gpt) targets")
    parser.add_argument("--out", type=Path, default=None, help="where JSON and plots go (default docs/benchmarks)")
    parser.add_argument("--no-doc", action="store_true", help="do not write the tables into docs/benchmarks.md")
    parser.add_argument("--tag", default="", help="a name part for the files and the doc section (e.g. race): "
                                                  "runs with another tag keep theirs")
    parser.add_argument("--compare", type=Path, nargs="+", default=None, metavar="RESULT.json",
                        help="print the speed-ups of several runs of one setting side by side, and exit")
    parser.add_argument("--render", action="store_true",
                        help="redo tables, plots and docs from the saved JSON (of --model only, when given; "
                             "--targets replaces the saved targets)")
    add_task_arguments(parser)
    parser.set_defaults(budget=None, points=None)
    args = parser.parse_args(argv)
    args.model_given = any(a == "--model" or a.startswith("--model=") for a in (argv or sys.argv[1:]))
    if args.quick:
        args.model, args.workers, args.link = "mlp", [2], ["100mbit"]
        args.budget = args.budget or 20.0
        args.points = args.points or 8
        args.copies = 10
    args.budget = args.budget or 150.0
    args.points = args.points or 30
    fill_defaults(args)
    out = args.out or (Path(tempfile.gettempdir()) / "istfx-tta-quick" if args.quick else ROOT / "docs" / "benchmarks")
    doc = None if (args.quick or args.no_doc) else DOC
    if args.compare:
        print(tta_report.compare({str(path): json.loads(path.read_text()) for path in args.compare}))
        return 0
    if args.render:
        tag = f"{args.tag}_" if args.tag else ""
        for path in sorted(out.glob(f"tta_{tag}{args.model}_*.json" if args.model_given else f"tta_{tag}*.json")):
            result = json.loads(path.read_text())
            if args.targets:
                result["targets"] = args.targets
            publish(result, out, doc)
        return 0
    for link in args.link:
        try:
            netem.parse_rate(link)
        except ValueError as exc:
            parser.error(str(exc))
    if min(args.workers) < 2 or max(args.workers) > 64:
        parser.error(f"--workers must lie in 2..64, got {args.workers}")
    command = "sudo .venv/bin/python benchmarks/time_to_accuracy.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    try:
        netem.require_root()
        with tempfile.TemporaryDirectory(prefix="istfx-tta-") as tmp:
            for link in args.link:
                with netem.EmulatedNetwork(max(args.workers), link) as net:
                    for workers in args.workers:
                        result = run_setting(net, args, workers, link, Path(tmp))
                        result["command"] = command.strip()
                        result["tag"] = args.tag
                        publish(result, out, doc)
    except netem.NetworkError as exc:
        print(f"time_to_accuracy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the namespaces were removed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
