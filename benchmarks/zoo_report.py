"""docs/zoo.md from the rows of ``benchmarks/zoo.py`` (``docs/zoo.json``): summary, tables, failures by cause."""
from __future__ import annotations

import re
import statistics
from collections import defaultdict
from typing import Any

VENV = """\
```
python3.11 -m venv /work/zoo-venv
/work/zoo-venv/bin/pip install torch torchvision transformers safetensors tqdm numpy sympy hypothesis pytest
/work/zoo-venv/bin/pip install -e . --no-deps        # istfx from this checkout
nice -n 10 /work/zoo-venv/bin/python benchmarks/zoo.py
```"""


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _yn(value: Any) -> str:
    return {True: "yes", False: "**no**", None: "-"}.get(value, str(value))


def _err(row: dict, field: str) -> str:
    value = row.get(field)
    if isinstance(value, dict):
        return value.get("error", "")
    return value or ""


def _fmt_err(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and x != x:
        return "nan"
    return f"{x:.1e}" if x else "0"


def status(row: dict) -> str:
    """captured / not captured / timeout / crash."""
    if row.get("timeout"):
        return "captured, then timeout" if row.get("captured") else "timeout"
    if row.get("crash") and not row.get("captured"):
        return "crash"
    return _yn(row.get("captured"))


def all_good(row: dict) -> bool:
    mask = row.get("mask", {})
    return bool(row.get("captured") and row.get("groups", {}).get("split") and row.get("round_trip")
                and mask.get("ok") and row.get("train_run") and row.get("eval_run") and not row.get("timeout")
                and not row.get("crash"))


def _where(e: dict) -> str:
    """Where an error was raised: the graph op and the model's source line, or the innermost istfx frame."""
    if e.get("op"):
        return f"`{e['op']}`" + (f" at {e['source']}" if e.get("source") else "") + \
            (f" (module `{e['module']}`)" if e.get("module") else "")
    return e.get("istfx_frame") or e.get("frame", "")


def failures(row: dict) -> list[tuple[str, str, str]]:
    """(stage, error, where) for each thing that went wrong in a row."""
    out = []
    if row.get("timeout"):
        out.append(("timeout", row["timeout"], ""))
    if row.get("crash"):
        out.append(("crash", row["crash"], ""))
    if row.get("captured") is False:
        e = row.get("compile_error", {})
        out.append(("compile", e.get("error", ""), _where(e)))
        return out
    if not row.get("captured"):
        return out
    if row.get("round_trip") is False:
        e = row.get("round_trip_error", {})
        out.append(("round trip", e.get("error", ""), _where(e)))
    mask = row.get("mask", {})
    if mask.get("checked") and mask.get("ok") is False:
        if mask.get("error"):
            out.append(("mask equivalence", mask["error"], _where(mask)))
        else:
            out.append(("mask equivalence", f"max error {_fmt_err(mask.get('max_error'))} (outputs up to "
                        f"{_fmt_err(mask.get('max_output'))})", ""))
    if row.get("train_run") is False:
        e = row.get("train_error", {})
        out.append(("subnet, train mode", e.get("error", ""), _where(e)))
    if row.get("eval_run") is False:
        e = row.get("eval_error", {})
        out.append(("subnet, eval mode", e.get("error", ""), _where(e)))
    if row.get("groups", {}).get("split") == 0:
        out.append(("nothing split", "; ".join(list(row.get("frozen_why", {}))[:1] +
                                               list(row.get("shared_why", {}))[:1]), ""))
    return out


BENIGN = ("kernel window", "model input", "model output", "rows looked up by token id")


def _benign(reason: str) -> bool:
    """Frozen for a reason every model has (a conv's kernel window, the batch axis, the logits)."""
    return any(b in reason for b in BENIGN)


def why(row: dict) -> str:
    """The reasons a row falls short, in one cell."""
    parts = [f"{stage}: {error[:220]}" + (f" ({where})" if where else "") for stage, error, where in failures(row)
             if stage != "nothing split"]
    if row.get("captured"):
        if row.get("no_rule_ops"):
            parts.append("no axis rule: " + ", ".join(f"`{op}`" for op in row["no_rule_ops"][:4]))
        shared = [f"{k} ({v})" for k, v in list(row.get("shared_why", {}).items())[:2]]
        frozen = [f"{k} ({v})" for k, v in row.get("frozen_why", {}).items() if not _benign(k)][:2]
        if frozen:
            parts.append("frozen: " + "; ".join(frozen))
        if shared:
            parts.append("shared: " + "; ".join(shared))
        em = row.get("eval_mask")
        if em and em.get("ok") is False:
            parts.append(f"eval mode != masked model in eval mode ({_fmt_err(em.get('max_error'))}"
                         + (f"; {em['error']}" if em.get("error") else "") + ")")
    if row.get("exported") is False:
        parts.append("bare torch.export fails too: " + row.get("export_error", "")[:200])
    return "; ".join(parts)


def _ratio(row: dict) -> str:
    if not row.get("compile_s") or not row.get("export_s"):
        return "-"
    return f"{row['compile_s']:.1f} / {row['export_s']:.1f} ({row['compile_s'] / row['export_s']:.1f}x)"


def _measured(row: dict) -> str:
    """When and at which istfx commit the row was measured."""
    when = str(row.get("run_at", "")).split(" ")
    text = when[1] if len(when) > 1 else "-"
    return text + (f" `{row['istfx_commit']}`" if row.get("istfx_commit") else "")


def table(rows: list[dict], hf: bool) -> list[str]:
    lines = [
        "| model | params | dtype | captured | groups split / shared / frozen | round trip | mask max error "
        "| train | eval | eval = masked | largest subnet | compile s / export s | why / notes | measured |",
        "| --- | ---: | --- | --- | --- | --- | --- | --- | --- | --- | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        g = r.get("groups")
        groups = f"{g['split']} / {g['shared']} / {g['frozen']}" if g else "-"
        mask = r.get("mask", {})
        if not r.get("captured") or "mask" not in r:
            mask_text = "-"
        elif not mask.get("checked"):
            mask_text = "nothing split"
        elif mask.get("error"):
            mask_text = "**error**"
        else:
            mask_text = _fmt_err(mask.get("max_error")) + ("" if mask.get("ok") else " **(fails)**")
        em = r.get("eval_mask")
        if not em:
            eval_mask = "-"
        elif em.get("ok") is None:
            eval_mask = "n/a (see JSON)"
        else:
            eval_mask = "yes" if em.get("ok") else f"**no** ({_fmt_err(em.get('max_error'))})"
        largest = f"{r['largest_subnet']:.3f}" if r.get("largest_subnet") is not None else "-"
        name = r.get("model", r["name"])
        if hf:
            name = f"{name} (`{r['name']}`)"
        notes = why(r)
        if hf and r.get("note"):
            notes = r["note"] + ("; " + notes if notes else "")
        lines.append(
            f"| {_cell(name)} | {r.get('parameters', 0):,} | {r.get('dtype', '-')} | {status(r)} | {groups} | "
            f"{_yn(r.get('round_trip'))} | {mask_text} | {_yn(r.get('train_run'))} | {_yn(r.get('eval_run'))} | "
            f"{eval_mask} | {largest} | {_ratio(r)} | {_cell(notes)} | {_measured(r)} |")
    return lines


def roles_table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | class | heads | FFN | layers droppable (`blocks=\"*\"`) | params/subnet heads+FFN / +layers |",
        "| --- | --- | --- | --- | --- | ---: |",
    ]
    for r in rows:
        if not r.get("captured") or "heads" not in r:
            continue
        heads = r["heads"] + (f"; {r['heads_detail']}" if r.get("heads_detail") else "")
        if r.get("blocks"):
            layers = f"{len(r['blocks'])}: `{r['block_pattern']}`"
            if r.get("depth_scaling") == "train":
                layers += " (train scaling)"
            depth = f"{r['parameters_per_subnet_depth']:,}"
        else:
            layers = f"no ({r.get('depth_error', 'no droppable block')})"
            depth = "-"
        lines.append(f"| {_cell(r.get('model', r['name']))} | `{r.get('cls', '')}` | {_cell(heads)} | "
                     f"{_cell(r.get('ffn', ''))} | {_cell(layers)} | "
                     f"{max(r.get('parameters_per_subnet') or [0]):,} / {depth} |")
    return lines


def summary(rows: list[dict]) -> dict:
    captured = [r for r in rows if r.get("captured")]
    split = [r for r in captured if r.get("groups", {}).get("split")]
    ratios = sorted(r["compile_s"] / r["export_s"] for r in captured if r.get("compile_s") and r.get("export_s"))
    largest = [r["largest_subnet"] for r in split if r.get("largest_subnet") is not None]
    worst = max(captured, key=lambda r: r["compile_s"] / r["export_s"] if r.get("export_s") else 0, default=None)
    return {
        "models": len(rows),
        "exported": sum(1 for r in rows if r.get("exported")),
        "captured": len(captured),
        "timeouts": sum(1 for r in rows if r.get("timeout")),
        "split": len(split),
        "round_trip": sum(1 for r in captured if r.get("round_trip")),
        "mask_ok": sum(1 for r in split if r.get("mask", {}).get("ok")),
        "train_run": sum(1 for r in captured if r.get("train_run")),
        "eval_run": sum(1 for r in captured if r.get("eval_run")),
        "eval_mask_ok": sum(1 for r in split if r.get("eval_mask", {}).get("ok")),
        "all_good": sum(1 for r in rows if all_good(r)),
        "ratio_median": statistics.median(ratios) if ratios else None,
        "ratio_worst": ratios[-1] if ratios else None,
        "ratio_worst_model": worst.get("name") if worst and ratios else None,
        "largest_median": statistics.median(largest) if largest else None,
    }


def summary_lines(rows: list[dict], label: str) -> list[str]:
    s = summary(rows)
    if not s["models"]:
        return []
    ratio = (f"median {s['ratio_median']:.1f}x, worst {s['ratio_worst']:.1f}x (`{s['ratio_worst_model']}`)"
             if s["ratio_median"] is not None else "-")
    largest = f"{s['largest_median']:.3f}" if s["largest_median"] is not None else "-"
    return [
        f"| {label} | {s['models']} | {s['exported']} | {s['captured']} | {s['timeouts']} | {s['split']} | "
        f"{s['round_trip']} | {s['mask_ok']} | {s['train_run']} | {s['eval_run']} | {s['eval_mask_ok']} | "
        f"**{s['all_good']}** | {largest} | {ratio} |"
    ]


def failure_groups(rows: list[dict]) -> list[str]:
    groups: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    example: dict[tuple[str, str, str], str] = {}
    for r in rows:
        for stage, error, where in failures(r):
            if stage in ("timeout", "crash"):
                key = (stage, re.sub(r"after \d+ s ", "", error.split(":")[0] if stage == "crash" else error), "")
            else:
                key = (stage, re.sub(r"\d+", "N", error)[:200], re.sub(r" at .*", "", where))
                example.setdefault(key, f"{r['name']}: {where}" if where else "")
            groups[key].append(r["name"])
    lines = ["| stage | error (numbers as N) | raised at (first model's) | models |", "| --- | --- | --- | --- |"]
    for key, names in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        stage, error, _ = key
        lines.append(f"| {stage} | {_cell(error)} | {_cell(example.get(key, '')) or '-'} | "
                     f"{len(names)}: {', '.join(names)} |")
    return lines


def no_rule_ops(rows: list[dict]) -> list[str]:
    ops: dict[str, list[str]] = defaultdict(list)
    sources: dict[str, set] = defaultdict(set)
    for r in rows:
        for op in r.get("no_rule_ops", []):
            ops[op].append(r["name"])
        for text in r.get("no_rule", {}):
            op, _, source = text.partition(" at ")
            if source:
                sources[op].add(re.sub(r"^\S*site-packages/", "", source))
    lines = ["| op | models | sources (first 2) |", "| --- | --- | --- |"]
    for op, names in sorted(ops.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"| `{op}` | {len(names)}: {', '.join(names)} | {_cell('; '.join(sorted(sources[op])[:2]))} |")
    return lines


def markdown(data: dict) -> str:
    rows = data.get("rows", [])
    runs = data.get("runs", [])
    tv = [r for r in rows if r["zoo"] == "torchvision"]
    hf = [r for r in rows if r["zoo"] == "hf"]
    run = runs[-1] if runs else {}
    lines = [
        "# istfx over public model zoos",
        "",
        "Generated by `benchmarks/zoo.py` (do not edit by hand): every torchvision classification model "
        "(`torchvision.models.list_models(module=torchvision.models)`) and Hugging Face architectures built from "
        "tiny configs (hidden 32, 2 layers, 4 heads or 8 query heads in 4 KV groups, FFN 64, vocabulary 97), "
        "all with random weights, no download. One process per model, one thread, a timeout per model; "
        f"S = {run.get('subnets', 4)} subnets, round 1 for mask equivalence.",
        "",
        "Runs (the rows carry their own `run_at` in docs/zoo.json):",
        "",
    ]
    for r in runs:
        lines.append(f"- `{r.get('command')}`: started {r.get('started')}, last row {r.get('finished', '-')}, "
                     f"{r.get('done', 0)}/{r.get('models')} models, timeout {r.get('timeout_s'):.0f} s; "
                     f"torch {r.get('torch')}, torchvision {r.get('torchvision')}, transformers "
                     f"{r.get('transformers')}, Python {r.get('python')}, istfx at `{r.get('istfx_commit')}`"
                     + (f"; {r['note']}" if r.get("note") else ""))
    missing = run.get("models", 0) - run.get("done", 0) if run else 0
    if missing > 0:
        lines += ["", f"**Partial results: the last run stopped after {run.get('done')} of {run.get('models')} "
                      "models; the tables show the rows measured so far.**"]
    measured = {(r["zoo"], r["name"]) for r in rows}
    for zoo, names in data.get("zoos", {}).items():
        absent = [n for n in names if (zoo, n) not in measured]
        if absent:
            lines += ["", f"**Not measured yet ({zoo}, {len(absent)} of {len(names)}):** "
                          + ", ".join(f"`{n}`" for n in absent) + "."]
    lines += [
        "",
        "The environment: torchvision's PyPI wheel links CUDA libraries and does not import next to the "
        "project's CPU build of torch, so the benchmark has a venv of its own with the default wheels (they run "
        f"on CPU; the last run's: torch {run.get('torch')}, torchvision {run.get('torchvision')}, transformers "
        f"{run.get('transformers')}; the project's own venv has torch 2.13.0+cpu):",
        "",
        VENV,
        "",
        "Other invocations: `--zoo torchvision|hf` (one zoo), `--only NAME ...` (a few rows; merged into "
        "docs/zoo.json), `--quick` (a handful, printed), `--timeout SECONDS` (default 600), `--render` "
        "(this page again from docs/zoo.json).",
        "",
        "## Summary",
        "",
        "| zoo | models | bare export | captured (`istfx.compile`) | timeouts | something split | round trip "
        "bit exact | mask-equivalent | subnets run, train | subnets run, eval | eval = masked eval | all of "
        "these | largest subnet (median) | compile / export time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        *summary_lines(tv, "torchvision"),
        *summary_lines(hf, "Hugging Face"),
        "",
        "- **captured**: `istfx.compile(model, subnets=4, example_inputs=...)` returned; **bare export**: "
        "`torch.export.export(model, args, kwargs, strict=False)` of the same model and inputs, in the same "
        "process (after a warm-up export of a small module). **compile s / export s**: their wall times.",
        "- **groups**: coupled-axis groups split / shared (exact but kept whole, or approximate, e.g. "
        "normalised) / frozen (a model input or output, an op without an axis rule, ...).",
        "- **round trip**: `check_round_trip` of tests/conftest.py (decompose + reassemble untrained changes "
        "nothing, bit for bit). **mask max error**: every subnet of round 1 against the full model with the "
        "units it does not hold zeroed (`masked_model` of tests/conftest.py), training mode, in the row's "
        "dtype; it passes with conftest's tolerance (atol 1e-10, rtol 1e-8) in float64, atol = rtol = 1e-4 in "
        "float32. Counted over the models with something split.",
        "- **train / eval**: every subnet runs on a batch of 3 (the example batch is 2) in training mode "
        "(`check_interface`) and after `subnet.eval()`, with the model's output structure and shapes and "
        "finite values. **eval = masked**: subnet 0 in evaluation mode against the masked model in evaluation "
        "mode (BatchNorm running statistics, no dropout); `n/a` where a row was measured before a34ede5, "
        "whose comparison used subnets whose BatchNorm statistics the training-mode calls had moved (only "
        "its failures are withdrawn).",
        "- **largest subnet**: parameters of the largest subnet / the model's (1/S + what is shared; 1.0 "
        "when nothing is split).",
        "- Dropout and stochastic depth are set to 0 (as the Hugging Face configs' dropout), so training-mode "
        "outputs are deterministic. torchvision models take 224 x 224 images (299 for inception_v3), batch 2, "
        "in float64 (float32 above 150 M parameters).",
        "",
        "## torchvision classification models",
        "",
        *table(tv, hf=False),
        "",
        "## Hugging Face architectures",
        "",
        *table(hf, hf=True),
        "",
        "### Roles: attention heads, FFN units, droppable layers",
        "",
        "Columns at S = 4: **heads** = groups of attention heads (or KV groups) split / found, units per group "
        "and per subnet; **FFN** = the same for FFN hidden units; **layers** = residual blocks the depth pass "
        "deals out with `blocks=\"*\"` (a separate compile); **params/subnet** = the largest subnet with heads "
        "+ FFN split, then with layers dealt out too. Roles come from `istfx.passes.role_summary`, read off "
        "the axis algebra, not off the config.",
        "",
        *roles_table(hf),
        "",
        "## Failures by cause",
        "",
        "Every check that failed, grouped by its error (the first line; numbers as N) and the istfx frame "
        "that raised it.",
        "",
        *failure_groups(rows),
        "",
        "## Ops without an axis rule",
        "",
        "Their axes are frozen (never guessed) and listed in `plan.diagnostics`.",
        "",
        *no_rule_ops(rows),
        "",
    ]
    return "\n".join(lines) + "\n"
