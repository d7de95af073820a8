"""The report's sections about the run as a whole: what was trained, whether the run failed, the
lineage, the stages, what to look at, the safety probe, the files and how to use them with Ollama."""

from __future__ import annotations

from typing import Any

from cpt_kit.report.facts import Facts
from cpt_kit.report.plots import PLOT_CAPTIONS
from cpt_kit.report.render import Block, Bullets, Code, Heading, Plot, Table, Text, fmt


def summary(facts: Facts) -> list[Block]:
    """What was trained, on what, how long, how good; for a failed run first that it failed, and its error."""
    blocks: list[Block] = []
    failed = facts.failed()
    if failed:
        blocks.append(Text(f"**This run failed at {', '.join(name for name, _ in failed)}.** Its outputs are not "
                           "ready to use. The sections below show what the stages before the failure measured. Fix "
                           "the cause and run the same command again: finished stages are kept and this report is "
                           "written again."))
        blocks += [Code(f"{name}: {error}") for name, error in failed if error]
    return blocks + [Text(_what(facts))]


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
                     + (f" in {duration(took)}" if took else "")
                     + (f" ({tm.get('backend')} backend, {tm.get('precision')})" if tm.get("backend") else "") + ".")
    ev = facts.metrics("evaluate")
    if "ppl_base" in ev and "ppl_trained" in ev:
        change = (ev["ppl_trained"] - ev["ppl_base"]) / ev["ppl_base"] * 100
        parts.append(f"Held-out perplexity {fmt(ev['ppl_base'])} -> **{fmt(ev['ppl_trained'])}** ({change:+.1f}%).")
    total = sum(e.get("seconds") or 0 for e in facts.manifest.get("stages", {}).values())
    parts.append(f"All stages together took {duration(total)}.")
    return " ".join(parts)


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def lineage(facts: Facts) -> list[Block]:
    chain = facts.manifest.get("lineage") or []
    if not chain:
        return []
    rows = tuple((str(i), str(a.get("recipe", a.get("name", "?"))), str(a.get("base", "?")),
                  str(a.get("merged_sha256", a.get("weights_hash", "")))[:16]) for i, a in enumerate(chain))
    names = " -> ".join([str(chain[0].get("base", "?"))] + [str(a.get("recipe", a.get("name", "?"))) for a in chain]
                        + [facts.name])
    return [Heading("Lineage"), Text(f"This model was built from another run: {names}."),
            Table(("#", "run (recipe)", "its base", "merged weights hash"), rows)]


def stages(facts: Facts) -> list[Block]:
    from cpt_kit.summary import headline_metrics

    rows = []
    for name, entry in facts.manifest.get("stages", {}).items():
        if name == "report":  # the stage writing this report: the manifest says "running" (or an earlier state)
            rows.append((name, "this report", "", ""))
            continue
        status = entry.get("status", "?")
        if status == "failed":
            detail = (entry.get("error") or "").strip().split("\n")[0]
        elif status == "stale":
            detail = f"out of date: {entry.get('stale_because', '')}"
        else:
            detail = headline_metrics(entry.get("metrics", {}))
        seconds = entry.get("seconds")
        rows.append((name, status, duration(seconds) if seconds is not None else "", detail))
    return [Heading("Stages"), Table(("stage", "status", "time", "key numbers"), tuple(rows))]


def look_at(facts: Facts) -> list[Block]:
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
    if facts.verify and not facts.verify.get("passed", True):
        notes.append("Export verification failed: see its section below before using the GGUF.")
    gate = (facts.safety or {}).get("gate") or {}
    if gate and not gate.get("passed"):
        notes.append("The safety probe failed" + (" and was overridden (safety.accept_failure=true)"
                                                  if gate.get("overridden") else "")
                     + ": read the failing answers in safety.json before anyone uses this model.")
    return [Heading("What to look at"), Bullets(tuple(notes))] if notes else []


def safety(facts: Facts, has_plot: bool) -> list[Block]:
    if not facts.safety or not facts.safety.get("ran", True):  # {"ran": false}: a recipe without a probe
        return []
    rows = []
    for model, r in facts.safety.get("pass_rates", {}).items():
        for category, v in r.get("categories", {}).items():
            rows.append((model, category, fmt(v.get("rate")), f"{v.get('passed')}/{v.get('total')}"))
        rows.append((model, "**overall**", fmt(r.get("overall")), f"{r.get('passed')}/{r.get('total')}"))
    blocks: list[Block] = [Heading("Safety probe"),
                           Text("A smoke test with fixed prompts and rules, **not a clinical validation**. "
                                + str(facts.safety.get("notice", ""))),
                           Table(("model", "category", "pass rate", "passed"), tuple(rows))]
    gate = facts.safety.get("gate", {})
    if gate:
        state = "passed" if gate.get("passed") else "failed, overridden by the user (recorded in the manifest)" \
            if gate.get("overridden") else "failed: the model is not published"
        blocks.append(Text(f"Gate: **{state}**" + (":" if gate.get("reasons") else ".")))
        if gate.get("reasons"):
            blocks.append(Bullets(tuple(gate["reasons"])))
    if has_plot:
        blocks.append(Plot("report/safety.png", PLOT_CAPTIONS["safety"]))
    return blocks


def files(facts: Facts) -> list[Block]:
    found = facts.files()
    blocks: list[Block] = [Heading("Files")]
    if found:
        blocks.append(Table(("file", "size"), tuple((f"`{p}`", _size(size)) for p, size in found)))
    if facts.metrics("compare").get("comparison"):
        blocks.append(Text(f"Before / after, the same prompts answered by every model of the lineage: "
                           f"`{facts.metrics('compare')['comparison']}`."))
    blocks.append(Text(f"Everything is under `{facts.run.root}`; `manifest.json` records the recipe, library "
                       "versions, and per stage its inputs, outputs (with content hashes), timings and metrics."))
    return blocks + _ollama(facts)


def _size(size: int) -> str:
    return f"{size / 1e6:,.1f} MB" if size >= 100_000 else f"{size / 1e3:,.1f} kB"


def _ollama(facts: Facts) -> list[Block]:
    from cpt_kit.export.ollama import ollama_name

    modelfile = facts.run.ollama / "Modelfile"
    if not (modelfile.is_file() and facts.done("modelfile")):
        return []
    failed = facts.failed()
    if failed:
        return [Heading("Use it with Ollama"),
                Text(f"Not yet: the run failed at {', '.join(name for name, _ in failed)}. Once it finishes, "
                     "this section gives the commands that create and run the model in Ollama.")]
    name = ollama_name(facts.name)
    return [Heading("Use it with Ollama"), Code(f"ollama create {name} -f {modelfile}\nollama run {name}")]


def all_metrics(facts: Facts) -> list[Block]:
    return [Heading("All metrics"), Text("Every number each stage recorded in `manifest.json`."),
            Table(("stage", "metric", "value"), tuple(
                (stage, key, fmt(value)) for stage, entry in facts.manifest.get("stages", {}).items()
                for key, value in entry.get("metrics", {}).items() if _scalar(value)))]


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) and len(str(value)) <= 80
