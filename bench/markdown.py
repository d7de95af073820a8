"""Adding a benchmark's results to BENCHMARKS.md without touching what is already there."""

from __future__ import annotations

import os
from pathlib import Path


def add_to_section(path: Path, section: str, text: str) -> None:
    """Insert `text` (a `### ...` subsection) at the end of the `## {section}` section of the Markdown
    file at `path`, before the next `## ` heading; the section is added at the end when it is missing.
    Nothing else in the file changes: earlier runs and hand-written notes stay."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else ["# Benchmarks"]
    heading = f"## {section}"
    if heading not in (line.strip() for line in lines):
        lines += ["", heading]
    start = [line.strip() for line in lines].index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    head, tail = lines[:end], lines[end:]
    while head and not head[-1].strip():
        head.pop()
    new = head + [""] + text.strip("\n").splitlines() + ([""] + tail if tail else [])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(new) + "\n", encoding="utf-8")
    os.replace(tmp, path)
