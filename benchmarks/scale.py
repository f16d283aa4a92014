"""Scale: memory per worker against S, and the widest MLP each worker can train under a memory cap.

Two parts, on IST's wide MLP (64 -> W -> W -> 10) trained on digits with one
process per worker on this machine (gloo on 127.0.0.1, one thread each,
plain SGD), the jobs of ``benchmarks/dist_memory.py``:

``sweep``
    IST with ``--topology sharded`` at S = 1, 2, 4, 8 workers: parameters
    each worker trains (its subnet), bytes it keeps between rounds (slices,
    its share of the idle elements, shared tensors) and its peak resident
    memory; DDP on 4 workers for reference (every worker holds the model).
    Runs at W = 64 give the fixed cost of a worker (interpreter, torch,
    gloo, compiled graphs), subtracted in "model memory".

``cap``
    The widest W that trains when every worker is capped at a fixed memory
    budget, IST sharded on 4 workers against DDP on 4 workers, as in IST's
    Amazon-670k result where data parallel no longer fits. The cap is
    enforced by the kernel: each worker runs in its own memory cgroup
    (``benchmarks/memcap.py``; needs root and cgroup v1 or v2 with the
    memory controller). A width trains when every worker completes every
    round without being OOM-killed; whether the whole job also completed
    (``istfx train --topology sharded`` ends by gathering the model onto
    rank 0) is recorded next to it. Widths are searched by doubling from a
    start width, then bisecting between the widest width that trained and
    the narrowest that did not. Where cgroups are unavailable the script says
    so and compares the measured peak resident memory of each worker with
    the budget instead: a computed limit, not an enforced one
    (``--no-cgroups`` forces that mode). The cgroups are removed on exit,
    on Ctrl-C and on SIGTERM.

    python benchmarks/scale.py                  # both parts: docs/scale.json, docs/scale.png and the tables
                                                # in docs/benchmarks_scale.md (~15 min; the cap needs root)
    python benchmarks/scale.py --quick          # S = 1, 2, 4 at W = 2048; a 640 MiB cap tried at W = 4096
                                                # and 8192 only; prints only (~3 min)
    python benchmarks/scale.py --part cap --budget-mib 1024

The initial state of an IST job is written once by this script (outside the
caps), as the ``istfx train`` launcher does; the workers read only their rows
of it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dist_memory as dm  # noqa: E402  (the jobs: IST ranks, DDP ranks)
from mdsection import write_section  # noqa: E402

ROOT = dm.ROOT
MB = dm.MB
DOC = ROOT / "docs" / "benchmarks_scale.md"


# -- the search -------------------------------------------------------------------------------------
def widest(fits: Callable[[int], bool], start: int, step: int, limit: int, bisections: int
           ) -> tuple[int | None, int | None, list[tuple[int, bool]]]:
    """The largest multiple of `step` for which ``fits`` holds, assuming it holds up to some width only.

    Doubles from `start` (halves when `start` does not fit) until a width
    fails or `limit` is passed, then bisects at most `bisections` times
    between the widest fit and the narrowest failure, to `step`.
    Returns (widest width that fit or None, narrowest that failed or None,
    every trial as (width, fit) in order).
    """
    if step < 1 or start < step or start % step:
        raise ValueError(f"start ({start}) must be a positive multiple of step ({step})")
    trials: list[tuple[int, bool]] = []

    def trial(width: int) -> bool:
        ok = bool(fits(width))
        trials.append((width, ok))
        return ok

    low: int | None = None
    high: int | None = None
    width = start
    if trial(width):
        low = width
        while width * 2 <= limit:
            width *= 2
            if not trial(width):
                high = width
                break
            low = width
    else:
        high = width
        while width // 2 >= step and width // 2 % step == 0:
            width //= 2
            if trial(width):
                low = width
                break
            high = width
    for _ in range(bisections):
        if low is None or high is None or high - low <= step:
            break
        middle = (low + high) // 2 // step * step
        if middle <= low:
            break
        if trial(middle):
            low = middle
        else:
            high = middle
    return low, high, trials


# -- part 1: the sweep over S ---------------------------------------------------------------------------
def sweep(width: int, subnets: list[int], settings: dm.Settings, folder: Path, log, reference: bool = True
          ) -> dict:
    """IST sharded at every S in `subnets`; with `reference`, DDP at 4 workers and the fixed costs at W = 64."""
    out: dict = {"width": width, "subnets": subnets, "rows": [], "load_average_start": os.getloadavg()[0]}
    fixed = {"sharded": 0.0, "ddp": 0.0}
    for method in ("sharded", "ddp") if reference else ():
        job = _checked(dm.run_job(method, 64, 2, settings, folder))
        fixed[method] = max(job.metrics["rss_peak_mb"])
        log(f"  fixed cost {method}: {fixed[method]:.0f} MiB per worker ({job.seconds:.0f}s)")
    out["fixed_cost_mb"] = fixed if reference else None
    full, _ = dm.mlp_split_bytes(width, 1)
    out["parameter_mb"] = full / MB
    for s in subnets:
        job = _checked(dm.run_job("sharded", width, s, settings, folder))
        peak = max(job.metrics["rss_peak_mb"])
        row = {"method": "IST sharded", "workers": s, "parameters_per_worker": job.metrics["parameters_per_subnet"],
               "state_mb": max(job.metrics["state_bytes"]) / MB, "peak_mb": peak,
               "model_memory_mb": peak - fixed["sharded"], "seconds_per_round": job.metrics["seconds_per_round"]}
        out["rows"].append(row)
        log(f"  sharded S={s}: {row['parameters_per_worker']:,} parameters, state {row['state_mb']:.1f} MiB, "
            f"peak {peak:.0f} MiB per worker ({job.seconds:.0f}s)")
    if not reference:
        out["load_average_end"] = os.getloadavg()[0]
        return out
    job = _checked(dm.run_job("ddp", width, 4, settings, folder))
    peak = max(job.metrics["rss_peak_mb"])
    out["rows"].append({"method": "DDP", "workers": 4, "parameters_per_worker": full // 4,
                        "state_mb": job.metrics["parameter_bytes"] / MB, "peak_mb": peak,
                        "model_memory_mb": peak - fixed["ddp"], "seconds_per_round": job.metrics["seconds_per_round"]})
    log(f"  DDP 4 workers: peak {peak:.0f} MiB per worker ({job.seconds:.0f}s)")
    out["load_average_end"] = os.getloadavg()[0]
    return out


def _checked(job: dm.JobResult) -> dm.JobResult:
    if not job.ok:
        raise RuntimeError(f"{job.method} at W={job.width} on {job.world} workers failed: {job.error}")
    return job


def sweep_table(result: dict) -> str:
    """Markdown table of :func:`sweep`."""
    fixed = result["fixed_cost_mb"]
    lines = [
        f"Wide MLP 64-{result['width']}-{result['width']}-10 ({result['parameter_mb']:.0f} MiB of float32 "
        f"parameters, all of them split). "
        + (f"Fixed cost of a worker (the W = 64 run): IST {fixed['sharded']:.0f} MiB, DDP {fixed['ddp']:.0f} MiB. "
           if fixed else "No W = 64 runs (--quick): model memory is the whole peak. ")
        + f"Load average {result['load_average_start']:.1f} -> {result['load_average_end']:.1f} on "
        f"{os.cpu_count()} cores.",
        "",
        "| method | workers | parameters per worker | kept between rounds MiB | peak RSS per worker MiB "
        "| model memory MiB (peak - fixed) | model memory / parameters |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        kept = f"{row['state_mb']:.1f}" if row["method"] != "DDP" else f"{row['state_mb']:.1f} (the model)"
        params = f"{row['parameters_per_worker']:,}" if row["method"] != "DDP" else \
            f"{int(result['parameter_mb'] * MB / 4):,} (all)"
        lines.append(f"| {row['method']} | {row['workers']} | {params} | {kept} | {row['peak_mb']:.0f} | "
                     f"{row['model_memory_mb']:.0f} | {row['model_memory_mb'] / result['parameter_mb']:.2f} |")
    return "\n".join(lines)


# -- part 2: the widest MLP under a cap ----------------------------------------------------------------
def cap_search(budget_mb: int, world: int, start: int, step: int, limit: int, bisections: int,
               settings: dm.Settings, folder: Path, enforce: bool, log) -> dict:
    """For IST sharded and DDP on `world` workers: the widest W trainable within `budget_mb` per worker."""
    import memcap

    out: dict = {"budget_mb": budget_mb, "workers": world, "start": start, "step": step, "limit": limit,
                 "bisections": bisections, "rounds": settings.rounds,
                 "local_steps": settings.local_steps, "batch_size": settings.batch_size,
                 "load_average_start": os.getloadavg()[0]}
    reason = None
    if enforce:
        reason = memcap.available()
        if reason:
            log(f"  memory cgroups unavailable ({reason}): comparing measured peaks with the budget instead")
    else:
        reason = "--no-cgroups"
    out["enforced"] = reason is None
    out["why_not_enforced"] = reason
    caps = memcap.MemoryCaps() if reason is None else None
    try:
        if caps is not None:
            caps.__enter__()
            out["cgroup"] = caps.version
        for method in ("sharded", "ddp"):
            details: dict[int, dict] = {}

            def fits(width: int, method: str = method, details: dict = details) -> bool:
                saved = folder / f"trained_{width}.safetensors"
                extra = ("--save", str(saved)) if method == "sharded" else ()
                job = dm.run_job(method, width, world, settings, folder, caps,
                                 budget_mb * MB if caps is not None else None, extra_args=extra)
                for stale in folder.glob("init_*.safetensors"):
                    stale.unlink()  # up to gigabytes each
                saved_ok = None
                if extra:  # the whole job: training, then every rank writes its rows and rank 0 streams one file
                    saved_ok = job.ok and _saved_model_ok(saved, width)
                    saved.unlink(missing_ok=True)
                trained = job.rounds_completed == settings.rounds
                if not trained and not job.oom_killed:
                    raise RuntimeError(f"{method} at W={width} failed without running out of memory: {job.error}")
                peaks = job.metrics.get("rss_peak_mb")  # VmHWM of each worker up to its last round
                ok = trained and (caps is not None or max(peaks) <= budget_mb)
                details[width] = {"trains": ok, "job_completed": job.ok if saved_ok is None else saved_ok,
                                  "saved": saved_ok, "oom_killed": job.oom_killed,
                                  "rounds_completed": job.rounds_completed, "seconds": round(job.seconds, 1),
                                  "peak_rss_mb": peaks, "cgroup_peak_mb": job.charged_mb}
                verdict = "trains" if ok else "OOM-killed" if job.oom_killed else "over the budget"
                if ok and not job.ok:
                    verdict += " (every round done; then OOM-killed saving the model)"
                elif saved_ok:
                    verdict += ", saved (sharded checkpoint, exported to one file)"
                log(f"  {method:>7} W={width:>6}: {verdict} ({job.seconds:.0f}s"
                    f"{', peak ' + format(max(peaks), '.0f') + ' MiB' if peaks else ''})")
                return ok

            low, high, trials = widest(fits, start, step, limit, bisections)
            completed = [w for w, d in details.items() if d["job_completed"]]
            out[method] = {"widest": low, "narrowest_failed": high, "trials": trials,
                           "widest_job_completed": max(completed, default=None),
                           "details": {str(w): d for w, d in details.items()},
                           "parameters_at_widest": None if low is None else dm.mlp_split_bytes(low, 1)[0] // 4}
    finally:
        if caps is not None:
            caps.__exit__(None, None, None)
    out["load_average_end"] = os.getloadavg()[0]
    return out


def _saved_model_ok(path: Path, width: int) -> bool:
    """Whether `path` holds the whole trained MLP of `width` (header and shapes; read, not loaded)."""
    from istfx.runtime.checkpoint import CheckpointError, TensorFile

    try:
        with TensorFile(path) as handle:
            return handle.shape("layers.3.weight") == (width, width) and handle.shape("layers.0.weight") == (width, 64)
    except CheckpointError:
        return False


def cap_table(result: dict) -> str:
    """Markdown table of :func:`cap_search`."""
    how = (f"enforced by the kernel: one memory cgroup per worker, cgroup {result.get('cgroup', '')}"
           if result["enforced"] else
           f"NOT enforced ({result['why_not_enforced']}): a computed limit, the measured peak resident memory of "
           "every worker compared with the budget")
    lines = [
        f"Budget {result['budget_mb']} MiB per worker, {result['workers']} workers, {how}. A width trains when "
        f"every worker completes {result['rounds']} rounds x {result['local_steps']} steps (batch "
        f"{result['batch_size']}) "
        + ("without being OOM-killed" if result["enforced"] else
           "with a peak (up to its last round) within the budget; the end of the job is not compared")
        + f". Load average {result['load_average_start']:.1f} -> {result['load_average_end']:.1f}.",
        "",
        "| method | widest W that trains | its parameters | there: peak RSS / cgroup charge per worker MiB "
        "| narrowest W that failed | trials (W: trains / fails) | widest W whose whole job completed |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for method, label in (("sharded", "IST sharded, S = 4"), ("ddp", "DDP")):
        r = result[method]
        trials = ", ".join(f"{w}: {'trains' if ok else 'fails'}" for w, ok in r["trials"])
        widest_ = "none" if r["widest"] is None else f"{r['widest']:,}"
        params = "-" if r["parameters_at_widest"] is None else f"{r['parameters_at_widest'] / 1e6:.0f} M"
        failed = f"none up to {result['limit']:,}" if r["narrowest_failed"] is None else f"{r['narrowest_failed']:,}"
        there = r["details"].get(str(r["widest"]), {}) if r["widest"] else {}
        peaks, charged = there.get("peak_rss_mb"), [c for c in there.get("cgroup_peak_mb") or [] if c is not None]
        peak = "-" if not peaks else f"{max(peaks):.0f}" + (f" / {max(charged):.0f}" if charged else "")
        done = "-" if r.get("widest_job_completed") is None else f"{r['widest_job_completed']:,}"
        done = done if result["enforced"] else "- (not capped)"
        lines.append(f"| {label} | {widest_} | {params} | {peak} | {failed} | {trials} | {done} |")
    if result["sharded"]["widest"] and result["ddp"]["widest"]:
        w_ist, w_ddp = result["sharded"]["widest"], result["ddp"]["widest"]
        bound = "at least " if result["sharded"]["narrowest_failed"] is None else ""
        bound = "at most " if result["ddp"]["narrowest_failed"] is None and not bound else bound
        if not (result["sharded"]["narrowest_failed"] is None and result["ddp"]["narrowest_failed"] is None):
            lines += ["", f"IST sharded trains an MLP {bound}{w_ist / w_ddp:.2f}x as wide as DDP does ({bound}"
                          f"{(w_ist / w_ddp) ** 2:.1f}x the parameters of the W x W layer) within the same "
                          f"per-worker budget."]
    return "\n".join(lines)


# -- the figure -----------------------------------------------------------------------------------------
def plot(sweep_result: dict | None, cap_result: dict | None, path: Path) -> bool:
    """docs/scale.png: memory per worker vs S, and the cap search's trials. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [p for p in (sweep_result, cap_result) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    k = 0
    if sweep_result:
        ax = axes[0][k]
        k += 1
        rows = [r for r in sweep_result["rows"] if r["method"] == "IST sharded"]
        s = [r["workers"] for r in rows]
        ax.plot(s, [r["model_memory_mb"] for r in rows], "o-", label="IST sharded: peak - fixed cost")
        ax.plot(s, [r["state_mb"] for r in rows], "s--", label="IST sharded: kept between rounds")
        ax.plot(s, [sweep_result["parameter_mb"] / x for x in s], ":", color="grey", label="parameters / S")
        ddp = next(r for r in sweep_result["rows"] if r["method"] == "DDP")
        ax.axhline(ddp["model_memory_mb"], color="C3", label="DDP (4 workers): peak - fixed cost")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(s, [str(x) for x in s])
        ax.set_xlabel("workers S")
        ax.set_ylabel("MiB per worker")
        ax.set_title(f"MLP 64-{sweep_result['width']}-{sweep_result['width']}-10")
        ax.legend(fontsize=7)
    if cap_result:
        ax = axes[0][k]
        for y, (method, label) in enumerate((("sharded", "IST sharded"), ("ddp", "DDP"))):
            for w, ok in cap_result[method]["trials"]:
                whole = cap_result[method]["details"][str(w)]["job_completed"]
                ax.scatter(w, y, marker="o" if ok else "x", s=40, color="C2" if ok else "C3",
                           facecolors=None if whole or not ok else "none")
            if cap_result[method]["widest"]:
                ax.annotate(f"{cap_result[method]['widest']:,}", (cap_result[method]["widest"], y),
                            textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
        ax.set_yticks([0, 1], ["IST sharded", "DDP"])
        ax.set_ylim(-0.6, 1.6)
        ax.set_xscale("log", base=2)
        ticks = sorted({w for m in ("sharded", "ddp") for w, _ in cap_result[m]["trials"] if w & (w - 1) == 0})
        ax.set_xticks(ticks, [f"{w:,}" for w in ticks])
        ax.set_xlabel("hidden width W (o trains, x OOM-killed; hollow: rounds done, final gather OOM-killed)",
                      fontsize=8)
        ax.set_title(f"{cap_result['workers']} workers, {cap_result['budget_mb']} MiB each"
                     + ("" if cap_result["enforced"] else " (computed)"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("sweep", "cap", "both"), default="both")
    parser.add_argument("--quick", action="store_true",
                        help="sweep at W = 2048 over S = 1, 2, 4 (no DDP, no fixed-cost runs); cap of 640 MiB, "
                             "doubling from 4096 to 8192 only; writes nothing")
    parser.add_argument("--width", type=int, default=None, help="sweep width (default 8192; 2048 with --quick)")
    parser.add_argument("--budget-mib", type=int, default=None, help="per-worker cap (default 768; 640 with --quick)")
    parser.add_argument("--start", type=int, default=None, help="first width of the cap search (2048; 4096 quick)")
    parser.add_argument("--limit", type=int, default=None, help="widest width tried (65536; 8192 with --quick)")
    parser.add_argument("--step", type=int, default=256, help="width resolution of the cap search")
    parser.add_argument("--bisections", type=int, default=None, help="bisection steps (default 3; 0 with --quick)")
    parser.add_argument("--no-cgroups", action="store_true", help="compare measured peaks with the budget instead")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds a job may run before it is stopped (default 600; more on a loaded machine)")
    parser.add_argument("--json", type=Path, default=None,
                        help="write the numbers here instead of docs/scale.json and docs/benchmarks_scale.md")
    args = parser.parse_args(argv)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    dm.interrupt_on_sigterm()
    settings = dm.Settings(rounds=2, local_steps=2, batch_size=32, timeout=args.timeout)
    result: dict = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="istfx-scale-") as tmp:
        folder = Path(tmp)
        if args.part in ("sweep", "both"):
            width = args.width or (2048 if args.quick else 8192)
            log(f"sweep: W = {width}")
            result["sweep"] = sweep(width, [1, 2, 4] if args.quick else [1, 2, 4, 8], settings, folder, log,
                                    reference=not args.quick)
            print(sweep_table(result["sweep"]) + "\n")
        if args.part in ("cap", "both"):
            budget = args.budget_mib or (640 if args.quick else 768)
            bisections = args.bisections if args.bisections is not None else (0 if args.quick else 3)
            log(f"cap: {budget} MiB per worker")
            start_width = args.start or (4096 if args.quick else 2048)
            limit = args.limit or (8192 if args.quick else 1 << 16)
            result["cap"] = cap_search(budget, 4, start_width, args.step, limit, bisections, settings, folder,
                                       not args.no_cgroups, log)
            print(cap_table(result["cap"]))
    log(f"{time.perf_counter() - start:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if not args.quick and not args.json:
        docs = ROOT / "docs"
        previous = json.loads((docs / "scale.json").read_text()) if (docs / "scale.json").exists() else {}
        previous.update(result)  # one part run alone keeps the other's numbers
        (docs / "scale.json").write_text(json.dumps(previous, indent=1) + "\n")
        if "sweep" in result:
            write_section(DOC, "scale sweep", sweep_table(result["sweep"]))
        if "cap" in result:
            write_section(DOC, "scale cap", cap_table(result["cap"]))
        if plot(previous.get("sweep"), previous.get("cap"), docs / "scale.png"):
            log("wrote docs/scale.png")
        else:
            log("matplotlib is not installed (pip install -e '.[bench]'): no docs/scale.png")
    return result


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("scale.py: interrupted; its workers were stopped and its cgroups removed", file=sys.stderr)
        raise SystemExit(130) from None
