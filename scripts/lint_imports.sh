#!/usr/bin/env bash
# Checks the import-linter contracts of pyproject.toml ([tool.importlinter]) on the source tree.
# passes/, backends/ and models/ import as istfx.passes/backends/models (pyproject's package-dir), which an
# import graph built from the istfx/ folder alone would not see: the packages are copied into the layout the
# wheel has, in a temporary folder, and the graph is built from there.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON=${PYTHON:-"$repo/.venv/bin/python"}
work="$(mktemp -d "${TMPDIR:-/tmp}/istfx-imports.XXXXXX")"
trap 'rm -rf "$work"' EXIT
"$PYTHON" - "$repo" "$work" <<'PY'
import shutil, sys, tomllib
from pathlib import Path

repo, work = Path(sys.argv[1]), Path(sys.argv[2])
config = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
for package, folder in sorted(config["package-dir"].items(), key=lambda kv: kv[0].count(".")):
    shutil.copytree(repo / folder, work / package.replace(".", "/"), ignore=shutil.ignore_patterns("__pycache__"),
                    dirs_exist_ok=True)
PY
cp "$repo/pyproject.toml" "$work/pyproject.toml"  # lint-imports reads the contracts from the current folder
cd "$work"
PYTHONPATH="$work" "$(dirname "$PYTHON")/lint-imports" --no-cache "$@"
