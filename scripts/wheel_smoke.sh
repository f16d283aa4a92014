#!/usr/bin/env bash
# Builds the wheel, installs it (not editable) into a fresh venv with the pinned CPU torch, and runs what a
# user runs first: the CLI's help, `istfx inspect`, a short `istfx train --backend local`, and the Python API.
# Run from anywhere; the work happens in a temporary folder so the source tree cannot shadow the install.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON=${PYTHON:-python3}
work="$(mktemp -d "${TMPDIR:-/tmp}/istfx-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "wheel smoke: building the wheel"
"$PYTHON" -m pip wheel -q --no-deps -w "$work/dist" "$repo"
wheel=$(ls "$work"/dist/istfx-*.whl)
echo "wheel smoke: installing $(basename "$wheel") into a fresh venv"
"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
"$work/venv/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$work/venv/bin/python" -m pip install -q "$wheel[data]"
cp -r "$repo/examples/models" "$work/models"
cd "$work"
# The installed package, not a source folder, must be what runs.
"$work/venv/bin/python" - <<'PY'
import istfx, pathlib
assert "site-packages" in pathlib.Path(istfx.__file__).parts, istfx.__file__
import istfx.core.rules, istfx.backends, istfx.passes, istfx.models, istfx.cli, istfx.runtime.training  # every layer imports
import torch
model = istfx.models.ISTMLP(16, [32], 4)
ist = istfx.compile(model, subnets=2)
subnets = ist.decompose(round=0)
assert all(s(torch.randn(3, 16)).shape == (3, 4) for s in subnets)
ist.reassemble(subnets)
print("wheel smoke: python API ok,", istfx.__file__)
PY
"$work/venv/bin/istfx" --help >/dev/null
"$work/venv/bin/istfx" inspect models/mlp.py --subnets 4
"$work/venv/bin/istfx" train models/mlp_digits.py --backend local --subnets 2 --rounds 3 --local-steps 5
echo "wheel smoke: passed"
