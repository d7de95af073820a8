"""The one-screen summary printed at the end of `cpt-kit run`."""

from __future__ import annotations

from typing import Any

from cpt_kit.manifest import Manifest
from cpt_kit.rundir import RunDir


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


def headline_metrics(metrics: dict[str, Any], limit: int = 8) -> str:
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


def _display(path) -> str:
    """A path relative to the working directory when it is below it (shorter, copy-pasteable)."""
    from pathlib import Path
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def print_summary(console: Any, run: RunDir, manifest: Manifest, failed: bool = False) -> None:
    """The stage table, the outputs, and what to do next (for a failed run: that it failed, not a next step)."""
    from rich.table import Table

    from cpt_kit.pipeline import STAGE_TABLE

    table = Table(title=f"cpt-kit run: {_display(run.root)}", title_justify="left", expand=True)
    table.add_column("stage", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("key numbers", ratio=1)
    outputs: list[str] = []
    for stage in STAGE_TABLE:
        name = stage.name
        entry = manifest.stage(name)
        if not entry:
            continue
        status = entry.get("status", "?")
        colour = {"done": "green", "failed": "red", "running": "yellow", "stale": "yellow"}.get(status, "white")
        seconds = entry.get("seconds")
        table.add_row(name, f"[{colour}]{status}[/{colour}]", f"{seconds:.1f}s" if seconds is not None else "",
                      _first_line(entry.get("error", "")) if status == "failed" else headline_metrics(entry.get("metrics", {})))
        for top in dict.fromkeys(p.split("/")[0] for p in stage.outputs):
            output = run.root / top
            shown = top + ("/" if output.is_dir() else "")
            if status == "done" and output.exists() and shown not in outputs:
                outputs.append(shown)
    console.print(table)
    if outputs:
        console.print(f"outputs in {_display(run.root)}/: " + "  ".join(outputs))
    modelfile = run.ollama / "Modelfile"
    broken = [name for name, entry in manifest.data["stages"].items() if entry.get("status") == "failed"]
    # a stale verify (after `--stage gguf --force`) has not checked what the Modelfile points at
    unfinished = [name for name, entry in manifest.data["stages"].items()
                  if entry.get("status") in ("failed", "stale", "running")]
    if manifest.stage("safety").get("status") == "failed":
        console.print(f"[red]not published:[/red] the safety probe failed (see {_display(run.safety)}; "
                      "a smoke test, not a clinical validation)")
    elif manifest.data.get("overrides", {}).get("safety"):
        console.print("[yellow]warning:[/yellow] the safety probe failed and was overridden "
                      "(safety.accept_failure=true, recorded in the manifest)")
    if failed:
        console.print(f"[red]the run failed{' at ' + ', '.join(broken) if broken else ''}[/red] (error above): "
                      "its outputs are not ready to use; fix the cause and run the same command again "
                      "(finished stages are kept)")
    elif unfinished:
        console.print(f"[yellow]not ready:[/yellow] {', '.join(unfinished)} must run again (a stage before "
                      "them was redone); run the same command without --stage / --until to finish the run")
    elif manifest.stage("modelfile").get("status") == "done" and modelfile.is_file():
        name = manifest.data.get("recipe", {}).get("name", "my-model")
        console.print(f"next: [bold]ollama create {name} -f {_display(modelfile)}[/bold]")
    console.print(f"manifest: {_display(run.manifest)}")
