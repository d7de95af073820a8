"""The one-screen summary printed at the end of `cpt-kit run`."""

from __future__ import annotations

from typing import Any

from cpt_kit.manifest import Manifest
from cpt_kit.recipe import STAGES
from cpt_kit.rundir import RunDir

OUTPUTS = {"prepare": "data", "train": "adapter", "evaluate": "eval", "merge": "merged",
           "gguf": "gguf", "modelfile": "ollama", "verify": "verify"}


def _short(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (int, str)) and len(str(value)) <= 40:
        return str(value)
    return None


def _first_line(text: str, width: int = 100) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 3] + "..."


def headline_metrics(metrics: dict[str, Any], limit: int = 6) -> str:
    """The stage's own `headline` keys if it names them, else its first short scalar values."""
    keys = metrics.get("headline") or list(metrics)
    parts = []
    for key in keys:
        text = _short(metrics.get(key))
        if text is not None and key != "headline":
            parts.append(f"{key}={text}")
        if len(parts) == limit:
            break
    return ", ".join(parts)


def print_summary(console: Any, run: RunDir, manifest: Manifest) -> None:
    from rich.table import Table

    table = Table(title=f"cpt-kit run: {run.root}", show_lines=False)
    table.add_column("stage")
    table.add_column("status")
    table.add_column("time", justify="right")
    table.add_column("key numbers")
    table.add_column("output")
    for name in STAGES:
        entry = manifest.stage(name)
        if not entry:
            continue
        status = entry.get("status", "?")
        colour = {"done": "green", "failed": "red", "running": "yellow"}.get(status, "white")
        seconds = entry.get("seconds")
        output = getattr(run, OUTPUTS[name])
        table.add_row(name, f"[{colour}]{status}[/{colour}]", f"{seconds:.1f}s" if seconds is not None else "",
                      _first_line(entry.get("error", "")) if status == "failed" else headline_metrics(entry.get("metrics", {})),
                      str(output) if output.exists() else "")
    console.print(table)
    console.print(f"manifest: {run.manifest}")
