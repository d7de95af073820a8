"""The `report` stage and `cpt-kit report RUN_DIR`: `report.md`, `report.html` and `report/*.png`.

Written for someone who did not run it: what was trained, on what, how long, how good, what to
look at, where the files are, and how to use it with Ollama; for a run that failed at a stage after
prepare (the CLI still writes its report), which stage failed and its error first. Built from the
run's files alone (`facts.py`), so it can be regenerated any time; the numbers are those of the
manifest and of the files the stages wrote (data/stats.json, verify.json, safety.json).

    facts.py     reads the run directory
    sections.py  summary, lineage, stages, what to look at, safety, files and Ollama
    quality.py   perplexities and export verification
    data.py      data statistics
    plots.py     matplotlib figures (Agg)
    render.py    Markdown and self-contained HTML
"""

from __future__ import annotations

from typing import Any

from cpt_kit.report import sections
from cpt_kit.report.data import data
from cpt_kit.report.facts import Facts
from cpt_kit.report.plots import PLOT_CAPTIONS
from cpt_kit.report.quality import perplexities, verification
from cpt_kit.report.render import Block, Heading, Plot, fmt, html_page, markdown
from cpt_kit.rundir import RunDir, atomic_path, atomic_write_text

__all__ = ["build", "fmt", "run", "write_report"]
CURVES = ("loss", "learning_rate", "throughput", "perplexity")


def run(ctx) -> dict[str, Any]:
    path = write_report(ctx.run)
    ctx.log(f"report: {path}")
    return {"report": str(path.relative_to(ctx.run.root)), "plots": len(list((ctx.run.root / "report").glob("*.png"))),
            "headline": ["report", "plots"]}


def write_report(run: RunDir, html: bool = True) -> Any:
    """Write report.md (+ report.html) and the plots into `run`; returns the Markdown path."""
    facts = Facts.read(run)
    from cpt_kit.report.plots import figures

    with atomic_path(run.root / "report") as tmp:
        tmp.mkdir()
        made = figures(facts)
        for name, figure in made.items():
            figure.savefig(tmp / f"{name}.png")
    blocks = build(facts, list(made))
    atomic_write_text(run.root / "report.md", markdown(blocks))
    if html:
        atomic_write_text(run.root / "report.html", html_page(blocks, f"{facts.name}: cpt-kit run report", run.root))
    return run.root / "report.md"


def build(facts: Facts, plots: list[str]) -> list[Block]:
    """The report's blocks, in reading order; `plots` are the figures made (their file stems)."""
    curves = [Plot(f"report/{p}.png", PLOT_CAPTIONS[p]) for p in CURVES if p in plots]
    return [Heading(f"{facts.name}: cpt-kit run report", 1), *sections.summary(facts), *sections.lineage(facts),
            *sections.stages(facts), *perplexities(facts), *sections.look_at(facts),
            *([Heading("Curves"), *curves] if curves else []), *data(facts, "data" in plots),
            *verification(facts), *sections.safety(facts, "safety" in plots), *sections.files(facts),
            *sections.all_metrics(facts)]
