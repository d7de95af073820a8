"""The `report` stage and `cpt-kit report RUN_DIR`: `report.md`, `report.html` and `report/*.png`.

Written for someone who did not run it: what was trained, on what, how long, how good, what to
look at, where the files are, and how to use it with Ollama. Built from the run's files alone
(`facts.py`), so it can be regenerated any time; every number is the manifest's.

    facts.py    reads the run directory
    plots.py    matplotlib figures (Agg)
    render.py   Markdown and self-contained HTML
"""

from __future__ import annotations

from typing import Any

from cpt_kit.report.facts import Facts
from cpt_kit.report.render import Block, Code, Heading, Plot, Table, Text, html_page, markdown
from cpt_kit.rundir import RunDir, atomic_path, atomic_write_text

PLOT_CAPTIONS = {
    "loss": "Training loss per step and held-out loss at each evaluation",
    "learning_rate": "Learning rates: LoRA adapters and embed_tokens/lm_head",
    "throughput": "Training throughput (tokens/s) and memory",
    "perplexity": "Perplexity: base vs trained (held-out and replay text) and each exported format",
    "data": "Corpus documents kept, and dropped by reason",
    "safety": "Safety probe pass rate per category (HF model and exported GGUF)",
}


def fmt(value: Any) -> str:
    """How the report writes a metric (the test reads numbers back with the same rule)."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


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
    blocks = build(facts, sorted(made))
    atomic_write_text(run.root / "report.md", markdown(blocks))
    if html:
        atomic_write_text(run.root / "report.html", html_page(blocks, f"{facts.name}: cpt-kit run report", run.root))
    return run.root / "report.md"


def build(facts: Facts, plots: list[str]) -> list[Block]:
    blocks: list[Block] = [Heading(f"{facts.name}: cpt-kit run report", 1), Text(_what(facts))]
    blocks += _lineage(facts)
    blocks += [Heading("Stages"), _stage_table(facts)]
    blocks += _quality(facts)
    blocks += _look_at(facts)
    blocks += [Heading("Curves")] + [Plot(f"report/{p}.png", PLOT_CAPTIONS[p]) for p in plots
                                     if p in ("loss", "learning_rate", "throughput", "perplexity")]
    blocks += _data(facts, "data" in plots)
    blocks += _safety(facts, "safety" in plots)
    blocks += _files(facts)
    blocks += [Heading("All metrics"), Text("Every number each stage recorded in `manifest.json`."),
               Table(("stage", "metric", "value"), tuple(
                   (stage, key, fmt(value)) for stage, entry in facts.manifest.get("stages", {}).items()
                   for key, value in entry.get("metrics", {}).items() if _scalar(value)))]
    return blocks


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) and len(str(value)) <= 80


def _what(facts: Facts) -> str:
    r = facts.recipe
    model, lora, train, data = r.get("model", {}), r.get("lora", {}), r.get("train", {}), r.get("data", {})
    objective = {"cpt": "Continued pretraining", "sft": "Supervised fine-tuning (chat)"}.get(
        train.get("objective", "cpt"), train.get("objective", "Training"))
    sources = ", ".join(f"`{s}`" for s in data.get("sources", [])) or "(no sources recorded)"
    parts = [f"{objective} of `{model.get('base', '?')}` with LoRA r={lora.get('r')} (alpha {lora.get('lora_alpha')}"
             f"{', rsLoRA' if lora.get('use_rslora') else ''}) on all linear layers"
             f"{' plus embed_tokens/lm_head' if lora.get('train_embeddings') else ''}, on {sources}."]
    tm = facts.metrics("train")
    if tm:
        steps, tokens = tm.get("steps", tm.get("global_step")), tm.get("train_tokens", tm.get("tokens"))
        took = facts.stage("train").get("seconds")
        parts.append(f"Trained {fmt(steps)} steps" + (f" on {fmt(tokens)} tokens" if tokens else "")
                     + (f" in {_duration(took)}" if took else "")
                     + (f" ({tm.get('backend')} backend, {tm.get('precision')})" if tm.get("backend") else "") + ".")
    ev = facts.metrics("evaluate")
    if "ppl_base" in ev and "ppl_trained" in ev:
        change = (ev["ppl_trained"] - ev["ppl_base"]) / ev["ppl_base"] * 100
        parts.append(f"Held-out perplexity {fmt(ev['ppl_base'])} -> **{fmt(ev['ppl_trained'])}** ({change:+.1f}%).")
    total = sum(e.get("seconds") or 0 for e in facts.manifest.get("stages", {}).values())
    parts.append(f"All stages together took {_duration(total)}.")
    return " ".join(parts)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _lineage(facts: Facts) -> list[Block]:
    lineage = facts.manifest.get("lineage") or []
    if not lineage:
        return []
    rows = tuple((str(i), str(a.get("recipe", a.get("name", "?"))), str(a.get("base", "?")),
                  str(a.get("merged_sha256", a.get("weights_hash", "")))[:16]) for i, a in enumerate(lineage))
    chain = " -> ".join([str(lineage[0].get("base", "?"))] + [str(a.get("recipe", a.get("name", "?"))) for a in lineage]
                        + [facts.name])
    return [Heading("Lineage"), Text(f"This model was built from another run: {chain}."),
            Table(("#", "run (recipe)", "its base", "merged weights hash"), rows)]


def _stage_table(facts: Facts) -> Table:
    from cpt_kit.summary import headline_metrics

    rows = []
    for name, entry in facts.manifest.get("stages", {}).items():
        status = entry.get("status", "?")
        detail = entry.get("error", "").splitlines()[0] if status == "failed" and entry.get("error") else \
            headline_metrics(entry.get("metrics", {}))
        seconds = entry.get("seconds")
        rows.append((name, status, _duration(seconds) if seconds is not None else "", detail))
    return Table(("stage", "status", "time", "key numbers"), tuple(rows))


def _quality(facts: Facts) -> list[Block]:
    ev, ver = facts.metrics("evaluate"), facts.metrics("verify")
    rows = []
    labels = {"ppl_base": "held-out, base model", "ppl_trained": "held-out, trained model",
              "replay_ppl_base": "replay (general text), base", "replay_ppl_trained": "replay (general text), trained"}
    for key, label in labels.items():
        if key in ev:
            interval = ev.get(key + "_ci") or ev.get(key.replace("ppl", "ppl_ci"))
            rows.append((label, fmt(ev[key]), _interval(interval), fmt(ev.get("heldout_tokens", ev.get("tokens", "")))
                         if key.startswith("ppl") else fmt(ev.get("replay_tokens", ""))))
    for fmt_name, ppl in facts.format_perplexities().items():
        label = "merged HF model (transformers)" if fmt_name.upper() == "HF" else f"exported {fmt_name} (llama.cpp)"
        rows.append((label, fmt(ppl), "", ""))
    if not rows:
        return []
    blocks: list[Block] = [Heading("How good is it"), Table(("perplexity on", "value", "95% interval", "tokens"),
                                                            tuple(rows))]
    if ver:
        passed = ver.get("passed")
        blocks.append(Text(f"Export verification: **{'passed' if passed else 'FAILED'}**"
                           + (f" (token ids identical on {fmt(ver['tokenizer_match'])} probe texts)"
                              if "tokenizer_match" in ver else "") + "."))
    return blocks


def _interval(value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"{fmt(value[0])} - {fmt(value[1])}"
    return ""


def _look_at(facts: Facts) -> list[Block]:
    notes = []
    ev = facts.metrics("evaluate")
    if "ppl_base" in ev and "ppl_trained" in ev and ev["ppl_trained"] >= ev["ppl_base"]:
        notes.append("Held-out perplexity did not improve: check the corpus language, raise train.learning_rate "
                     "or train longer.")
    if "replay_ppl_base" in ev and "replay_ppl_trained" in ev and ev["replay_ppl_trained"] > 1.1 * ev["replay_ppl_base"]:
        rise = (ev["replay_ppl_trained"] / ev["replay_ppl_base"] - 1) * 100
        notes.append(f"Forgetting: perplexity on general (replay) text rose {rise:.0f}%. A larger "
                     "data.replay.fraction or a lower learning rate keeps more of what the base knew.")
    evals = [r["eval_loss"] for r in facts.train_log if "eval_loss" in r]
    if len(evals) >= 3 and evals[-1] > min(evals) * 1.02:
        notes.append("Held-out loss rose after its minimum: the last steps over-fit; fewer epochs or steps would do.")
    ver = facts.metrics("verify")
    if ver and not ver.get("passed", True):
        notes.append("Export verification failed: see verify.json and the verify row above before using the GGUF.")
    for name, entry in facts.manifest.get("stages", {}).items():
        if entry.get("status") == "failed":
            notes.append(f"Stage {name} failed: {entry.get('error', '').splitlines()[0] if entry.get('error') else ''}")
    if not notes:
        return []
    return [Heading("What to look at")] + [Text("- " + n) for n in notes]


def _data(facts: Facts, has_plot: bool) -> list[Block]:
    counts = facts.document_counts()
    pm = facts.metrics("prepare")
    if not counts and not pm:
        return []
    blocks: list[Block] = [Heading("Data")]
    if counts:
        blocks.append(Table(("documents", "count"), tuple((k, fmt(v)) for k, v in counts.items())))
    numbers = [(k, fmt(pm[k])) for k in ("train_tokens", "train_blocks", "heldout_tokens", "heldout_blocks",
                                        "corpus_tokens", "fertility", "fertility_before", "fertility_after",
                                        "replay_share", "tokens_added") if k in pm]
    if numbers:
        blocks.append(Table(("prepared", "value"), tuple(numbers)))
    if has_plot:
        blocks.append(Plot("report/data.png", PLOT_CAPTIONS["data"]))
    return blocks


def _safety(facts: Facts, has_plot: bool) -> list[Block]:
    if not facts.safety or not facts.safety.get("ran", True):  # {"ran": false}: a recipe without a probe
        return []
    rates = facts.safety.get("pass_rates", {})
    rows = []
    for model, r in rates.items():
        for cat, v in r.get("categories", {}).items():
            rows.append((model, cat, fmt(v.get("rate")), f"{v.get('passed')}/{v.get('total')}"))
        rows.append((model, "**overall**", fmt(r.get("overall")), f"{r.get('passed')}/{r.get('total')}"))
    blocks: list[Block] = [Heading("Safety probe"),
                           Text("A smoke test with fixed prompts and rules, **not a clinical validation**. "
                                + str(facts.safety.get("notice", ""))),
                           Table(("model", "category", "pass rate", "passed"), tuple(rows))]
    gate = facts.safety.get("gate", {})
    if gate:
        blocks.append(Text(f"Gate: **{'passed' if gate.get('passed') else 'failed'}**"
                           + (" (overridden by the user, recorded in the manifest)" if gate.get("overridden") else "")))
    if has_plot:
        blocks.append(Plot("report/safety.png", PLOT_CAPTIONS["safety"]))
    return blocks


def _files(facts: Facts) -> list[Block]:
    files = facts.files()
    blocks: list[Block] = [Heading("Files")]
    if files:
        blocks.append(Table(("file", "size"), tuple((f"`{p}`", f"{size / 1e6:,.1f} MB") for p, size in files)))
    if facts.metrics("compare").get("comparison"):
        blocks.append(Text(f"Before / after, the same prompts answered by every model of the lineage: "
                           f"`{facts.metrics('compare')['comparison']}`."))
    blocks.append(Text(f"Everything is under `{facts.run.root}`; `manifest.json` records the recipe, library "
                       "versions, and per stage its inputs, outputs (with content hashes), timings and metrics."))
    modelfile = facts.run.ollama / "Modelfile"
    if modelfile.is_file() and facts.done("modelfile"):
        blocks += [Heading("Use it with Ollama"),
                   Code(f"ollama create {facts.name} -f {modelfile}\nollama run {facts.name}")]
    return blocks
