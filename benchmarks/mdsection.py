"""Write a benchmark's generated table into a Markdown page, between markers, keeping the prose around it.

    write_section(Path("docs/benchmarks_scale.md"), "scale sweep", table)

replaces everything between ``<!-- scale sweep: begin -->`` and
``<!-- scale sweep: end -->``; a page without the markers is refused (the
benchmark says where to put them) rather than overwritten.
"""
from __future__ import annotations

from pathlib import Path


def markers(key: str) -> tuple[str, str]:
    """The begin and end markers of section `key`."""
    return f"<!-- {key}: begin -->", f"<!-- {key}: end -->"


def write_section(path: Path, key: str, body: str) -> None:
    """Replace section `key` of the Markdown file `path` by `body`."""
    begin, end = markers(key)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise SystemExit(f"{path} needs one '{begin}' line and one '{end}' line where the generated "
                         f"text goes; add them and run again")
    before, rest = text.split(begin, 1)
    _, after = rest.split(end, 1)
    path.write_text(f"{before}{begin}\n{body.strip()}\n{end}{after}", encoding="utf-8")
