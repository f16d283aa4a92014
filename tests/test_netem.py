"""The root-free logic of the time-to-accuracy benchmark: link commands, target crossings, tables.

Building namespaces needs root and is exercised by ``benchmarks/time_to_accuracy.py --quick``;
here only what can be checked without side effects.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import netem  # noqa: E402
import tta_report  # noqa: E402


# -- links ---------------------------------------------------------------------------------------------
def test_parse_rate_reads_tc_units():
    assert netem.parse_rate("100mbit") == 100_000_000
    assert netem.parse_rate("1Gbit") == 1_000_000_000
    assert netem.parse_rate("2.5mbit") == 2_500_000
    assert netem.parse_rate("none") is None


@pytest.mark.parametrize("bad", ["100", "fast", "0mbit", "-1gbit", "100mb"])
def test_parse_rate_refuses_what_tc_would_misread(bad):
    with pytest.raises(ValueError, match="e.g. 100mbit"):
        netem.parse_rate(bad)


@given(st.integers(1, 10_000), st.sampled_from(["kbit", "mbit", "gbit"]))
def test_rate_label_round_trips(value, unit):
    bits = netem.parse_rate(f"{value}{unit}")
    assert netem.parse_rate(netem.rate_label(bits)) == bits


def _namespaces_named(cmd: list[str]) -> list[str]:
    """Every namespace a command names (after -n, netns add/exec/delete, or a link's netns option)."""
    names = []
    for i, word in enumerate(cmd[:-1]):
        if word in ("-n", "netns") and cmd[i + 1] not in ("add", "exec", "delete"):
            names.append(cmd[i + 1])
        if word in ("add", "exec", "delete") and i > 0 and cmd[i - 1] == "netns":
            names.append(cmd[i + 1])
    return names


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 8), st.sampled_from([None, 10 ** 8, 10 ** 9]))
def test_setup_only_touches_its_own_namespaces(workers, rate):
    cmds = netem.setup_commands(workers, rate, prefix="t")
    switch, spaces = netem.namespaces(workers, "t")
    ours = {switch, *spaces}
    created: set[str] = set()
    for cmd in cmds:
        assert cmd[0] in ("ip",)
        named = _namespaces_named(cmd)
        assert named, f"a command outside any namespace: {cmd}"
        if cmd[1:3] == ["netns", "add"]:
            created.add(cmd[3])
        else:
            assert set(named) <= created, f"{cmd} uses a namespace before creating it"
        assert set(named) <= ours
    assert created == ours
    shaped = [c for c in cmds if "tbf" in c]
    # Both directions of every worker's link: its eth0 and its switch port.
    assert len(shaped) == (0 if rate is None else 2 * workers)
    addresses = [c[c.index("add") + 1] for c in cmds if "addr" in c]
    assert len(set(addresses)) == workers


def test_leftovers_are_only_ours():
    listing = "istfx-tta-w0 (id: 3)\nistfx-tta-sw (id: 2)\nsomeone-else\nistfx-tta-wx\nistfx-tta-w12\n"
    assert netem.leftover_namespaces(listing) == ["istfx-tta-w0", "istfx-tta-sw", "istfx-tta-w12"]


def test_tbf_bucket_holds_an_offload_burst():
    for bits in (10 ** 7, 10 ** 8, 10 ** 9, 10 ** 10):
        args = netem.tbf(bits)
        burst = int(args[args.index("burst") + 1])
        assert burst >= 64 * 1024 and burst >= bits // 8 // 500


# -- crossings and tables ----------------------------------------------------------------------------
def _run(accuracy, seconds, sent):
    return {"points": [{"train_seconds": t, "accuracy": a, "link_tx": [s, 0], "link_rx": [0, s],
                        "app_sent": [s, 0]} for a, t, s in zip(accuracy, seconds, sent)]}


def test_crossing_interpolates_between_evaluations():
    run = _run([0.1, 0.8, 0.95], [0.0, 10.0, 20.0], [0, 100, 300])
    hit = tta_report.reach(run, "accuracy", 0.9, True)
    assert hit["train_seconds"] == pytest.approx(10 + 10 * (0.1 / 0.15))
    assert hit["sent_total"] == pytest.approx(100 + 200 * (0.1 / 0.15))
    assert tta_report.reach(run, "accuracy", 0.99, True) is None
    assert tta_report.reach(run, "accuracy", 0.05, True)["train_seconds"] == 0.0


def test_crossing_lower_is_better_and_first_time_only():
    values = [3.0, 2.5, 2.9, 2.0]
    assert tta_report.crossing(values, 2.5, False) == (1, 1.0)
    assert tta_report.crossing(values, 2.2, False) == (3, pytest.approx((2.2 - 2.9) / (2.0 - 2.9)))
    assert tta_report.crossing([None, 3.0], 2.0, False) is None


@given(st.lists(st.floats(0, 1), min_size=2, max_size=30), st.floats(0.01, 0.99))
def test_crossing_is_the_first_place_the_target_is_met(values, target):
    where = tta_report.crossing(values, target, True)
    met = [v >= target for v in values]
    if not any(met):
        assert where is None
        return
    i, w = where
    assert i == met.index(True) and 0.0 <= w <= 1.0
    if i:
        interpolated = values[i - 1] + w * (values[i] - values[i - 1])
        assert interpolated == pytest.approx(target) or w == 1.0


def test_markdown_reports_speedups_and_unreached_targets():
    result = {"metric": "accuracy", "higher_is_better": True, "targets": [0.5, 0.9],
              "runs": {"ddp": _run([0.0, 0.6], [0.0, 40.0], [0, 4000]),
                       "ist-ps": _run([0.0, 0.6, 0.95], [0.0, 10.0, 20.0], [0, 10, 20])}}
    for run in result["runs"].values():
        for p in run["points"]:
            p.update(steps=1, samples=1, cpu_seconds=[1.0, 1.0], rank_seconds=[2.0, 2.0])
        run["setup_seconds"] = 1.0
    text = tta_report.markdown(result)
    row50 = next(line for line in text.splitlines() if line.startswith("| 50%"))
    assert "4.0x" in row50  # DDP needs 33.3 s, IST ps 8.3 s
    row90 = next(line for line in text.splitlines() if line.startswith("| 90%"))
    assert "not reached" in row90 and "IST only" in row90


def test_speedups_take_the_faster_ist_topology():
    result = {"metric": "accuracy", "higher_is_better": True, "targets": [0.5, 0.9],
              "runs": {"ddp": _run([0.0, 1.0], [0.0, 40.0], [0, 1]),
                       "localsgd": _run([0.0, 1.0], [0.0, 10.0], [0, 1]),
                       "ist-ps": _run([0.0, 1.0], [0.0, 12.0], [0, 1]),
                       "ist-sharded": _run([0.0, 0.6], [0.0, 5.0], [0, 1])}}
    (ddp50, local50), (ddp90, local90) = tta_report.speedups(result)
    assert ddp50 == pytest.approx(20 / (5 * 0.5 / 0.6)) and local50 == pytest.approx(5 / (5 * 0.5 / 0.6))
    assert ddp90 == pytest.approx(36 / 10.8) and local90 == pytest.approx(9 / 10.8)  # sharded never gets there
