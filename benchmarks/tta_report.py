"""Tables and plots of time-to-accuracy runs (``benchmarks/time_to_accuracy.py``); no side effects but files.

A *run* is one method's merged record: ``points`` (one per evaluation) with
rank 0's ``train_seconds``, the score (``accuracy`` or ``val_loss``) and,
per rank, the bytes its link carried (``link_tx``/``link_rx``) and the bytes
the method itself accounts for (``app_sent``). :func:`reach` finds when a
run first meets a target, linearly interpolated between evaluations, and
reads every other series (bytes) at the same place.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

__all__ = ["LABELS", "at", "compare", "crossing", "goals", "markdown", "plot", "race_markdown", "reach", "series",
           "speedups"]

LABELS = {"ddp": "DDP", "localsgd": "local SGD", "diloco": "DiLoCo (torchft)", "ist-ps": "IST ps",
          "ist-sharded": "IST sharded", "ist-ps-carry": "IST ps carry", "ist-ps-outer": "IST ps carry+outer",
          "ist-sharded-carry": "IST sharded carry", "ist-sharded-outer": "IST sharded carry+outer",
          "ist-sharded-outer-int8": "IST sharded carry+outer, int8"}
MB = 1e6


def _meets(value: float | None, target: float, higher_is_better: bool) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return value >= target if higher_is_better else value <= target


def crossing(values: Sequence[float | None], target: float, higher_is_better: bool) -> tuple[int, float] | None:
    """Where `values` first meet `target`: ``(i, w)`` meaning between point i-1 and i at fraction w.

    ``w = 1`` is point i itself; the first point meeting it gives ``(0, 1.0)``.
    None when no point meets it.
    """
    for i, value in enumerate(values):
        if not _meets(value, target, higher_is_better):
            continue
        if i == 0:
            return 0, 1.0
        before = values[i - 1]
        if before is None or value == before:
            return i, 1.0
        return i, min(1.0, max(0.0, (target - before) / (value - before)))
    return None


def _at(series_values: Sequence[float], where: tuple[int, float]) -> float:
    i, w = where
    if i == 0:
        return series_values[0]
    return series_values[i - 1] + w * (series_values[i] - series_values[i - 1])


def series(run: dict, key: str) -> list[float | None]:
    """One series over a run's points: a point key, or ``sent_total`` / ``busiest`` / ``app_total`` (bytes)."""
    out = []
    for p in run["points"]:
        if key == "sent_total":
            out.append(None if p.get("link_tx") is None else float(sum(p["link_tx"])))
        elif key == "busiest":
            out.append(None if p.get("link_tx") is None else float(max(max(p["link_tx"]), max(p["link_rx"]))))
        elif key == "app_total":
            out.append(float(sum(p["app_sent"])))
        else:
            out.append(p.get(key))
    return out


def reach(run: dict, metric: str, target: float, higher_is_better: bool,
          keys: Sequence[str] = ("train_seconds", "sent_total", "busiest")) -> dict | None:
    """Each of `keys` at the first point where `metric` meets `target` (interpolated); None if never."""
    where = crossing(series(run, metric), target, higher_is_better)
    if where is None:
        return None
    out = {}
    for key in keys:
        values = series(run, key)
        out[key] = None if any(v is None for v in values) else _at(values, where)
    return out


def at(run: dict, key: str, x: float, metric: str) -> float | None:
    """`metric` where series `key` (e.g. ``samples``) reaches `x`, linearly interpolated; None past the end."""
    xs, ys = series(run, key), series(run, metric)
    for i in range(1, len(xs)):
        if xs[i] >= x:
            if xs[i] == xs[i - 1]:
                return ys[i]
            w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + w * (ys[i] - ys[i - 1])
    return ys[-1] if xs and xs[-1] == x else None


def _target_text(metric: str, target: float) -> str:
    return f"{target:.0%}" if metric == "accuracy" else f"loss {target:g}"


def _cell(hit: dict | None) -> str:
    if hit is None:
        return "not reached"
    mb = hit.get("sent_total")
    return f"{hit['train_seconds']:.1f} s" + ("" if mb is None else f" · {mb / MB:.1f} MB")


def _ratio(a: dict | None, b: dict | None) -> str:
    if a is None or b is None:
        return "-" if a is None and b is None else ("IST only" if b is None else "-")
    return f"{b['train_seconds'] / max(a['train_seconds'], 1e-9):.1f}x"


def markdown(result: dict) -> str:
    """The tables of one setting (model, workers, link): time and bytes to targets, then per method."""
    metric, hib = result["metric"], result["higher_is_better"]
    runs = result["runs"]
    methods = [m for m in LABELS if m in runs]
    lines = [
        "| target | " + " | ".join(LABELS[m] for m in methods) + " | best IST vs DDP | best IST vs local SGD |",
        "| --- | " + " | ".join("---:" for _ in methods) + " | ---: | ---: |",
    ]
    for target in result["targets"]:
        hits = {m: reach(runs[m], metric, target, hib) for m in methods}
        ist = [hits[m] for m in IST_METHODS if m in hits and hits[m] is not None]
        best = min(ist, key=lambda h: h["train_seconds"]) if ist else None
        lines.append(f"| {_target_text(metric, target)} | " + " | ".join(_cell(hits[m]) for m in methods)
                     + f" | {_ratio(best, hits.get('ddp'))} | {_ratio(best, hits.get('localsgd'))} |")
    name = "accuracy" if metric == "accuracy" else "val loss"
    fewest = min(series(runs[m], "samples")[-1] for m in methods)
    lines += [
        "",
        f"| method | final {name} | best {name} | {name} after {fewest / 1e3:,.0f}k samples "
        "| steps per worker | samples/s (all workers) "
        "| MB sent, all links (counters) | MB by the method's own count | busiest link, MB/s | CPU share | set-up s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in methods:
        run = runs[m]
        last = run["points"][-1]
        scores = [v for v in series(run, metric) if v is not None]
        best = max(scores) if hib else min(scores)
        fmt = (lambda v: f"{v:.1%}") if metric == "accuracy" else (lambda v: f"{v:.3f}")
        seconds = max(last["train_seconds"], 1e-9)
        sent = series(run, "sent_total")[-1]
        busiest = series(run, "busiest")[-1]
        share = sum(last["cpu_seconds"]) / (len(last["cpu_seconds"]) * max(max(last["rank_seconds"]), 1e-9))
        lines.append(
            f"| {LABELS[m]} | {fmt(last[metric])} | {fmt(best)} | {fmt(at(run, 'samples', fewest, metric))} "
            f"| {last['steps']:,} | {last['samples'] / seconds:,.0f} "
            f"| {'-' if sent is None else f'{sent / MB:,.1f}'} | {series(run, 'app_total')[-1] / MB:,.1f} "
            f"| {'-' if busiest is None else f'{busiest / MB / seconds:.2f}'} | {share:.0%} "
            f"| {run['setup_seconds']:.0f} |")
    return "\n".join(lines)


IST_METHODS = ("ist-ps", "ist-ps-carry", "ist-ps-outer", "ist-sharded", "ist-sharded-carry", "ist-sharded-outer",
               "ist-sharded-outer-int8")


def _rounds(run: dict, local_steps: int) -> float:
    return max(run["points"][-1]["steps"] / max(local_steps, 1), 1e-9)


def _peak(run: dict) -> tuple[float | None, float | None]:
    """(largest peak RSS of a worker, largest peak RSS above the worker's pre-method baseline), MB."""
    peaks, bases = run.get("rss_peak_mb") or [], run.get("rss_base_mb") or []
    if not peaks or any(v is None for v in peaks):
        return None, None
    above = [p - b for p, b in zip(peaks, bases) if b is not None]
    return max(peaks), (max(above) if len(above) == len(peaks) else None)


def race_markdown(result: dict) -> str:
    """The tables of a race (DiLoCo and the IST variants next to DDP and local SGD), methods as rows."""
    metric, hib = result["metric"], result["higher_is_better"]
    runs = result["runs"]
    methods = [m for m in LABELS if m in runs]
    steps_per_round = result["task_args"]["local_steps"]
    targets = result["targets"]
    name = "accuracy" if metric == "accuracy" else "val loss"
    fmt = (lambda v: f"{v:.1%}") if metric == "accuracy" else (lambda v: f"{v:.3f}")
    lines = ["Time (training seconds) and MB sent on all links until each target is first met:", "",
             "| method | " + " | ".join(_target_text(metric, t) for t in targets) + " |",
             "| --- | " + " | ".join("---:" for _ in targets) + " |"]
    hits = {m: [reach(runs[m], metric, t, hib) for t in targets] for m in methods}
    for m in methods:
        lines.append(f"| {LABELS[m]} | " + " | ".join(_cell(h) for h in hits[m]) + " |")
    fewest = min(series(runs[m], "samples")[-1] for m in methods)
    shortest = min(runs[m]["points"][-1]["train_seconds"] for m in methods)
    lines += [
        "",
        f"| method | {name} at {shortest:.0f} s | best {name} | {name} after {fewest / 1e3:,.0f}k samples "
        "| steps per worker | MB sent per worker per round (own count) | MB sent, all links (counters) "
        "| peak RSS per worker, MB (above start) | CPU share | set-up s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in methods:
        run = runs[m]
        last = run["points"][-1]
        scores = [v for v in series(run, metric) if v is not None]
        best = max(scores) if hib else min(scores)
        sent = series(run, "sent_total")[-1]
        per_round = series(run, "app_total")[-1] / len(last["app_sent"]) / _rounds(run, steps_per_round)
        peak, above = _peak(run)
        share = sum(last["cpu_seconds"]) / (len(last["cpu_seconds"]) * max(max(last["rank_seconds"]), 1e-9))
        lines.append(
            f"| {LABELS[m]} | {fmt(at(run, 'train_seconds', shortest, metric))} | {fmt(best)} "
            f"| {fmt(at(run, 'samples', fewest, metric))} | {last['steps']:,} | {per_round / MB:.2f} "
            f"| {'-' if sent is None else f'{sent / MB:,.1f}'} "
            f"| {'-' if peak is None else f'{peak:,.0f}'}{'' if above is None else f' ({above:+,.0f})'} "
            f"| {share:.0%} | {run['setup_seconds']:.0f} |")
    return "\n".join(lines)


def goals(result: dict) -> dict:
    """The issue's goals for the best IST variant, measured: each a dict with the numbers and whether it is met.

    - ``quality``: final score within 2% of DDP's in the same budget;
    - ``speed``: every target reached at least 1.5x sooner than DiLoCo;
    - ``bytes``: at most 1/S of DiLoCo's bytes per round (own counts);
    - ``memory``: at most 0.5x DiLoCo's peak memory per worker (RSS above the start, and whole RSS).
    """
    metric, hib, runs = result["metric"], result["higher_is_better"], result["runs"]
    ist = [m for m in IST_METHODS if m in runs]
    if not ist or "diloco" not in runs:
        return {}
    steps_per_round, workers = result["task_args"]["local_steps"], result["workers"]
    final = {m: runs[m]["points"][-1][metric] for m in runs}
    best = (max if hib else min)(ist, key=lambda m: final[m])
    out: dict = {"best": best}
    if "ddp" in runs:
        gap = (final["ddp"] - final[best]) / abs(final["ddp"]) if hib else (final[best] - final["ddp"]) / abs(
            final["ddp"])
        out["quality"] = {"ist": final[best], "ddp": final["ddp"], "gap": gap, "met": gap <= 0.02}
    speed = []
    for t in result["targets"]:
        d = reach(runs["diloco"], metric, t, hib, keys=("train_seconds",))
        i = reach(runs[best], metric, t, hib, keys=("train_seconds",))
        speed.append({"target": t, "ist": i and i["train_seconds"], "diloco": d and d["train_seconds"],
                      "ratio": None if not (i and d) else d["train_seconds"] / max(i["train_seconds"], 1e-9)})
    out["speed"] = {"targets": speed, "met": all(s["ratio"] is not None and s["ratio"] >= 1.5 for s in speed
                                                 if s["diloco"] is not None) and any(s["ist"] for s in speed)}

    def per_round(m: str) -> float:
        return series(runs[m], "app_total")[-1] / workers / _rounds(runs[m], steps_per_round)

    out["bytes"] = {"ist": per_round(best), "diloco": per_round("diloco"),
                    "ratio": per_round(best) / max(per_round("diloco"), 1e-9)}
    out["bytes"]["met"] = out["bytes"]["ratio"] <= 1 / workers
    (pi, ai), (pd, ad) = _peak(runs[best]), _peak(runs["diloco"])
    if pi is not None and pd is not None:
        out["memory"] = {"ist": pi, "diloco": pd, "ratio": pi / pd,
                         "ist_above": ai, "diloco_above": ad,
                         "ratio_above": None if not (ai and ad) else ai / ad}
        out["memory"]["met"] = out["memory"]["ratio"] <= 0.5
    return out


def speedups(result: dict) -> list[tuple[float | None, float | None]]:
    """Per target: (best IST's speed-up over DDP, over local SGD), None where a side never got there."""
    metric, hib, runs = result["metric"], result["higher_is_better"], result["runs"]
    out = []
    for target in result["targets"]:
        hits = {m: reach(runs[m], metric, target, hib, keys=("train_seconds",)) for m in runs}
        ist = [hits[m]["train_seconds"] for m in IST_METHODS if hits.get(m)]
        best = min(ist) if ist else None
        out.append(tuple(None if best is None or not hits.get(base) else hits[base]["train_seconds"] / max(best, 1e-9)
                         for base in ("ddp", "localsgd")))
    return out


def compare(results: dict[str, dict]) -> str:
    """A markdown table of :func:`speedups` for several runs of one setting (``{label: result}``)."""
    first = next(iter(results.values()))
    targets = [_target_text(first["metric"], t) for t in first["targets"]]
    lines = ["| run | load avg | " + " | ".join(f"{t}: vs DDP / vs local SGD" for t in targets) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in targets) + " |"]
    for label, result in results.items():
        cells = [" / ".join("-" if v is None else f"{v:.1f}x" for v in pair) for pair in speedups(result)]
        load = result["machine"]["loadavg_start"][0], result["machine"]["loadavg_end"][0]
        lines.append(f"| {label} | {load[0]:.1f}-{load[1]:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Score against training seconds, MB sent on all links and samples seen, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, runs = result["metric"], result["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    for k, m in enumerate(m for m in LABELS if m in runs):
        run = runs[m]
        y = series(run, metric)
        axes[0].plot(series(run, "train_seconds"), y, marker=".", color=f"C{k}", label=LABELS[m])
        sent = series(run, "sent_total")
        if all(v is not None for v in sent):  # the untrained point has no place on log axes
            pairs = [(v / MB, s) for v, s, t in zip(sent, y, series(run, "steps")) if t > 0]
            axes[1].plot([p[0] for p in pairs], [p[1] for p in pairs], marker=".", color=f"C{k}", label=LABELS[m])
        seen = [(v / 1e6, s) for v, s in zip(series(run, "samples"), y) if v > 0]
        axes[2].plot([p[0] for p in seen], [p[1] for p in seen], marker=".", color=f"C{k}", label=LABELS[m])
    for ax in axes:
        for target in result["targets"]:
            ax.axhline(target, color="grey", lw=0.7, ls="--")
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("training seconds (evaluation excluded)")
    axes[1].set_xlabel("MB sent on all links (veth counters)")
    axes[1].set_xscale("log")
    axes[2].set_xlabel("training samples seen, all workers (millions)")
    axes[2].set_xscale("log")
    axes[0].set_ylabel("test accuracy" if metric == "accuracy" else "validation loss (nats/byte)")
    if metric == "accuracy":
        low = min(result["targets"]) - 0.1
        axes[0].set_ylim(low, 1.0)
    else:
        axes[0].set_ylim(min(result["targets"]) - 0.3, max(result["targets"]) + 0.8)
    axes[0].legend()
    fig.suptitle(f"{result['title']}: {result['workers']} workers, links {result['link']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
