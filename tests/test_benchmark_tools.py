"""The parts of the scale and compiler-cost benchmarks that decide their numbers.

- ``scale.widest``: the width search finds the boundary of any monotone fit,
  to its step, and every trial it reports is what the predicate said;
- ``compiler_costs``: the stage timers add up to the compile they time and
  are removed afterwards; one row of the table on a tiny MLP;
- ``memcap``: a process over its cap is OOM-killed, one under it is not, and
  the cgroups are gone afterwards (where this machine has memory cgroups);
- ``mdsection``: generated text replaces only its own section.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import compiler_costs  # noqa: E402
import memcap  # noqa: E402
import scale  # noqa: E402
from mdsection import write_section  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(threshold=st.integers(0, 20_000), step=st.sampled_from([1, 3, 64, 256]), start_units=st.integers(1, 40),
       bisections=st.integers(0, 30))
def test_widest_brackets_the_boundary(threshold, step, start_units, bisections):
    start, limit = step * start_units, 16_384
    low, high, trials = scale.widest(lambda w: w <= threshold, start, step, limit, bisections)
    assert all(ok == (w <= threshold) for w, ok in trials)
    assert all(w % step == 0 for w, _ in trials)
    assert len({w for w, _ in trials}) == len(trials)  # no width is tried twice
    if low is not None:
        assert low <= threshold and (low, True) in trials
    if high is not None:
        assert high > threshold and (high, False) in trials
    if low is not None and high is not None:
        assert low < high
        if bisections >= 30:
            assert high - low <= step  # enough bisections: the boundary to the step
    if low is None:  # nothing fit: the search went down to the narrowest width it may try
        assert high is not None and (high < 2 * step or (high // 2) % step)
    if high is None:  # nothing failed: it stopped at the limit
        assert low is not None and low * 2 > limit


def test_widest_rejects_a_start_off_the_grid():
    with pytest.raises(ValueError, match="multiple of step"):
        scale.widest(lambda w: True, 100, 64, 1000, 3)


def test_stage_timers_add_up_and_are_removed():
    import istfx.core.compiler as compiler

    originals = (compiler.capture, compiler.AxisAnalysis.run, compiler.SubnetTemplate)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    ist, stages = compiler_costs.compile_timed(model, ((torch.randn(4, 8),), {}), 2)
    assert (compiler.capture, compiler.AxisAnalysis.run, compiler.SubnetTemplate) == originals
    assert all(stages[k] > 0 for k in ("capture", "analysis", "templates", "total"))
    assert stages["plan"] >= 0
    assert stages["capture"] + stages["analysis"] + stages["templates"] + stages["plan"] == pytest.approx(
        stages["total"])
    assert len(ist.plan.split) == 1


def test_one_row_of_the_cost_table():
    from istfx.models import ISTMLP

    case = compiler_costs._ours("tiny", "ISTMLP 16-64-10", lambda: ISTMLP(16, [64], 10), compiler_costs._vector(16),
                                32)
    row = compiler_costs.measure(case, subnets=4, compile_repeats=1, repeats=3)
    assert row["parameters"] == 16 * 64 + 2 * 64 + 64 * 10
    assert row["parameters_per_subnet"] == 16 * 16 + 2 * 16 + 16 * 10
    assert row["subnet_parameter_share"] == pytest.approx(row["parameters_per_subnet"] / row["parameters"])
    for key in ("round_over_clone", "subnet_over_full", "captured_graph_over_full", "analysis_over_capture"):
        assert row[key] > 0
    assert "| ISTMLP 16-64-10 | istfx.models | 1,792 |" in compiler_costs.markdown([row])


def test_memory_cap_kills_only_the_process_over_it():
    """Where the kernel gives memory cgroups, a cap kills exactly the process over it; elsewhere the
    benchmark is told why in one line (and falls back to a computed limit)."""
    reason = memcap.available()
    if reason is not None:
        assert reason.strip()
        with pytest.raises((memcap.CapsUnavailable, OSError)):
            memcap.MemoryCaps()
        return
    allocate = "import sys; b = bytearray(int(sys.argv[1]) * 2 ** 20); b[::4096] = b'1' * len(b[::4096])"
    with memcap.MemoryCaps() as caps:
        small, big = caps.new(160 * 2 ** 20), caps.new(160 * 2 ** 20)
        ok = subprocess.run(small.wrap([sys.executable, "-c", allocate, "16"]))
        killed = subprocess.run(big.wrap([sys.executable, "-c", allocate, "400"]))
        assert ok.returncode == 0 and small.oom_kills() == 0
        assert killed.returncode != 0 and big.oom_kills() >= 1
        paths = [small.path, big.path]
    assert not any(p.exists() for p in paths)


def test_write_section_replaces_only_its_section(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- t: begin -->\nold\n<!-- t: end -->\noutro\n")
    write_section(page, "t", "new table")
    assert page.read_text() == "intro\n<!-- t: begin -->\nnew table\n<!-- t: end -->\noutro\n"
    with pytest.raises(SystemExit, match="needs one"):
        write_section(page, "other", "x")
