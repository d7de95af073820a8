"""The compare stage: the recipe's fixed prompts answered by every model of the run's lineage side by
side -> `eval/comparison.json` and `eval/comparison.md`.

For an SFT run from a CPT run that is: the original base -> the CPT model -> the SFT model (the
seeds' "before / after" tables). Each model is prompted the way it is used: through its chat
template when its tokenizer has one (the prompt as a user message, the SFT recipe's system prompt
first), else as a plain completion of the prompt text (what a base model gets from Ollama).
Greedy decoding, `eval.max_new_tokens` new tokens, one model in memory at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from cpt_kit.rundir import atomic_write_json, atomic_write_text


def input_fingerprint(ctx) -> list:
    """The ancestors' merged weights (outside this run): an ancestor run redone means new answers."""
    return [item.get("merged_sha256") or item.get("adapter_sha256") for item in ctx.manifest.data.get("lineage") or []]


def columns(ctx) -> list[dict[str, Any]]:
    """[{"label", "path"}] oldest first: the original model, each ancestor run, then this run.

    The manifest's `lineage` (cpt_kit.lineage) lists the ancestors oldest first; the first one's
    `base` is the original model. An ancestor PEFT adapter has no merged model of its own to
    prompt: it is left out (its base and the runs built on it are shown)."""
    from cpt_kit.model_source import resolve_base
    from cpt_kit.recipe import Model

    chain = ctx.manifest.data.get("lineage") or []
    if chain:
        original = chain[0]["base"]
        found = [{"label": f"original ({original})", "path": resolve_base(Model(base=original))}]
        found += [{"label": f"{item.get('objective', 'cpt')} run {item.get('recipe')!r}",
                   "path": str(Path(item["path"]) / "merged")} for item in chain if item.get("kind") == "run"]
    else:  # a run from a hub model or a plain folder: its own base is the "before"
        found = [{"label": f"base ({ctx.recipe.model.base})", "path": resolve_base(ctx.recipe.model)}]
    found.append({"label": f"this run ({ctx.recipe.train.objective} {ctx.recipe.name!r})", "path": str(ctx.run.merged)})
    return found


def answer(model_dir: str, prompts: list[str], system: Optional[str], max_new_tokens: int) -> tuple[str, list[str]]:
    """(mode, answers) of one model: mode is "chat" (its chat template) or "completion"."""
    from transformers import AutoTokenizer

    from cpt_kit.samples import generate_samples
    from cpt_kit.export.chat_template import end_of_turn_tokens
    from cpt_kit.safety.generate import hf_answers, load_model, ollama_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if getattr(tokenizer, "chat_template", None):
        texts = [ollama_prompt(tokenizer, system, p) for p in prompts]
        return "chat", hf_answers(Path(model_dir), tokenizer, texts, end_of_turn_tokens(tokenizer, None), max_new_tokens)
    model = load_model(Path(model_dir))
    samples = generate_samples(model, tokenizer, prompts, max_new_tokens)
    del model
    return "completion", [s["completion"].strip() for s in samples]


def markdown(table: dict[str, Any]) -> str:
    cols = table["models"]
    lines = ["# Before / after: the same prompts, every model of the lineage", "",
             "Greedy decoding, at most {} new tokens. Models: {}.".format(
                 table["max_new_tokens"], "; ".join(f"**{c['label']}** ({c['mode']})" for c in cols)), ""]
    for row in table["prompts"]:
        lines += [f"## {row['prompt']}", "", "| model | answer |", "|---|---|"]
        for col, text in zip(cols, row["answers"]):
            cell = " ".join(text.split()).replace("|", "\\|") or "*(empty)*"
            lines.append(f"| {col['label']} | {cell} |")
        lines.append("")
    return "\n".join(lines)


def run(ctx) -> dict:
    prompts = list(ctx.recipe.eval.prompts)
    out_json, out_md = ctx.run.eval / "comparison.json", ctx.run.eval / "comparison.md"
    if not prompts or ctx.recipe.eval.max_new_tokens == 0:
        table = {"models": [], "prompts": [], "max_new_tokens": 0, "skipped": "the recipe has no eval.prompts"}
        atomic_write_json(out_json, table)
        atomic_write_text(out_md, "# Before / after\n\nNo comparison: the recipe has no eval.prompts.\n")
        return {"models": 0, "headline": ["models"]}
    system = ctx.recipe.export.modelfile.system or ctx.recipe.sft.system_prompt
    cols = columns(ctx)
    for col in cols:
        col["mode"], col["answers"] = answer(col["path"], prompts, system, ctx.recipe.eval.max_new_tokens)
        ctx.log(f"{col['label']}: {len(prompts)} prompts answered ({col['mode']})")
    table = {"max_new_tokens": ctx.recipe.eval.max_new_tokens, "system": system,
             "models": [{"label": c["label"], "path": str(c["path"]), "mode": c["mode"]} for c in cols],
             "prompts": [{"prompt": p, "answers": [c["answers"][i] for c in cols]} for i, p in enumerate(prompts)]}
    atomic_write_json(out_json, table)
    atomic_write_text(out_md, markdown(table))
    return {"models": len(cols), "prompts": len(prompts), "comparison": "eval/comparison.md",
            "headline": ["models", "prompts", "comparison"]}
