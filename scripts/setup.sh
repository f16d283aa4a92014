#!/usr/bin/env bash
# Creates .venv with istfx and its test extras. Idempotent; safe to re-run.
# torch is pinned first: a bare `pip install torch` may pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
# Flower for istfx fl (the fl extra; the test extra lists it too).
.venv/bin/python -m pip install -q -e ".[fl]"
# The benchmarks' extras (matplotlib, torchft for DiLoCo); torchft installs next to the pinned torch.
.venv/bin/python -m pip install -q -e ".[bench]"
# DeepSpeed builds against the torch above only without build isolation (else it may fetch a CUDA torch).
.venv/bin/python -m pip install -q --no-build-isolation "deepspeed${DEEPSPEED_VERSION:-==0.19.8}"
# DeepSpeed JIT-builds its CPU shared-memory comm op on first use; build it now, so that no run waits on the
# build (an interrupted first build would leave a lock that istfx reports; see backends/deepspeed_engine.py).
.venv/bin/python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()" \
  >/dev/null
