"""The wheel ships every module: pyproject's package list matches the folders on disk."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _declared() -> tuple[set[str], dict[str, str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(config["packages"]), config.get("package-dir", {})


def _on_disk(package_dirs: dict[str, str]) -> set[str]:
    found = set()
    for top, folder in package_dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((top, *relative)))
    return found


def test_every_package_folder_is_in_the_wheel() -> None:
    declared, package_dirs = _declared()
    missing = _on_disk(package_dirs) - declared
    assert not missing, f"packages missing from pyproject.toml's [tool.setuptools] packages: {sorted(missing)}"


def test_every_declared_package_exists() -> None:
    declared, package_dirs = _declared()
    stale = declared - _on_disk(package_dirs)
    assert not stale, f"pyproject.toml lists packages with no folder: {sorted(stale)}"
