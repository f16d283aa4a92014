"""`istfx train` refuses bad flags and impossible checkpoint settings before any work, changing nothing.

Numeric flags must be finite and in range (the rule is
:func:`istfx.runtime.numbers.finite`, which the library's own arguments use
too); ``--resume`` with nothing to resume and ``--checkpoint-dir`` naming a
file are errors naming the path, raised before a rank is started or a model
is built.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from istfx.errors import ISTError
from istfx.runtime.numbers import finite

MODEL = "examples/models/mlp_digits.py"
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flag, value, says", [
    ("--lr", "nan", "--lr: must be a finite number > 0, got 'nan'"),
    ("--lr", "inf", "--lr: must be a finite number > 0"),
    ("--lr", "-0.1", "--lr: must be a finite number > 0"),
    ("--lr", "0", "--lr: must be a finite number > 0"),
    ("--momentum", "-1", "--momentum: must be a finite number >= 0"),
    ("--momentum", "nan", "--momentum: must be a finite number >= 0"),
    ("--timeout", "nan", "--timeout: must be a finite number > 0"),
    ("--round-timeout", "-3", "--round-timeout: must be a finite number > 0"),
    ("--heartbeat-timeout", "-inf", "--heartbeat-timeout: must be a finite number >= 0"),
    ("--data", "bogus", "--data: invalid choice: 'bogus'"),
])
def test_bad_numeric_or_choice_flag_is_refused_at_once(tmp_path, capsys, flag, value, says):
    from istfx.cli.train import main

    metrics = tmp_path / "m.jsonl"
    metrics.write_text("kept\n")
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        main([str(ROOT / MODEL), f"{flag}={value}", "--metrics", str(metrics),
              "--checkpoint-dir", str(tmp_path / "ck")])
    assert exit_.value.code == 2
    assert says in capsys.readouterr().err
    assert time.perf_counter() - start < 5
    assert metrics.read_text() == "kept\n" and not (tmp_path / "ck").exists()


def test_the_library_rule_for_numbers():
    assert finite("lr", "0.5", above=0.0) == 0.5
    assert finite("momentum", 0, minimum=0.0) == 0.0
    for bad in (math.nan, math.inf, -math.inf, -1.0, 0.0, "x", None, True):
        with pytest.raises(ISTError, match=r"^lr must be a finite number > 0, got "):
            finite("lr", bad, above=0.0)


def test_the_torch_backend_refuses_a_nonfinite_timeout():
    from istfx.backends.torch_base import TorchDistBackend

    for bad in (math.nan, -1.0, 0.0):
        with pytest.raises(ISTError, match="timeout must be a finite number > 0"):
            TorchDistBackend("ps", timeout=bad)


@pytest.mark.parametrize("backend", ["local", "torch"])
@pytest.mark.parametrize("case", ["missing", "no-manifest", "a-file", "no-dir"])
def test_resume_and_checkpoint_dir_errors_come_before_any_work(tmp_path, capsys, monkeypatch, backend, case):
    from istfx.cli import train

    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(train, "_train_local", no_work)
    monkeypatch.setattr(train, "_launch", no_work)
    monkeypatch.delenv("RANK", raising=False)
    ck = tmp_path / "ck"
    if case == "no-manifest":
        (ck / "round-000003").mkdir(parents=True)
        (ck / "round-000003" / "model.safetensors").write_bytes(b"partial")
    elif case == "a-file":
        ck.write_text("a file")
    metrics = tmp_path / "m.jsonl"
    metrics.write_text('{"round": 0}\n')
    argv = [str(ROOT / MODEL), "--backend", backend, "--metrics", str(metrics), "--resume"]
    if case != "no-dir":
        argv += ["--checkpoint-dir", str(ck)]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    expected = {"missing": f"resume: {ck} does not exist", "no-manifest": f"resume: {ck} holds no complete checkpoint",
                "a-file": f"checkpoint directory {ck} is a file", "no-dir": "--resume needs --checkpoint-dir"}[case]
    assert expected in err
    assert metrics.read_text() == '{"round": 0}\n'


def test_resume_if_present_without_a_checkpoint_goes_on(tmp_path, monkeypatch):
    from istfx.cli import train

    started = []
    monkeypatch.setattr(train, "_train_local", lambda args: started.append(args) or 0)
    monkeypatch.delenv("RANK", raising=False)
    argv = [str(ROOT / MODEL), "--backend", "local", "--checkpoint-dir", str(tmp_path / "ck"), "--resume-if-present"]
    assert train.main(argv) == 0 and len(started) == 1
    from istfx.cli.train import _fit_kwargs

    kwargs = _fit_kwargs(started[0], type("Loaded", (), {"function": lambda self, n: None,
                                                         "value": lambda self, n: None})(), None)
    assert kwargs["resume"] is True and kwargs["resume_if_present"] is True
