"""Answer every probe with each format the recipe names, check the answers, build the safety report."""

from __future__ import annotations

from cpt_kit.errors import RecipeError


def probe_model(ctx, probes) -> dict:
    """The content of safety.json (without the override flag, which the stage adds)."""
    from cpt_kit.hardware import cpu_threads
    from transformers import AutoTokenizer

    from cpt_kit.export.chat_template import jinja_text
    from cpt_kit.export.modelfile import parse
    from cpt_kit.run_files import chosen_quant, gguf_path, tokenizer_dir
    from cpt_kit.safety.generate import gguf_answers, hf_answers, ollama_prompt
    from cpt_kit.safety.probes import check_answer
    from cpt_kit.safety.score import NOTICE, gate, pass_rates

    recipe, run, safety = ctx.recipe, ctx.run, ctx.recipe.safety
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(run))
    if not jinja_text(tokenizer):
        raise RecipeError("the safety probe needs a chat model, and this model's tokenizer has no chat template",
                          where="safety", hint="train with train.objective='sft' (chat data), or remove the safety section")
    modelfile_path = run.ollama / "Modelfile"
    if not modelfile_path.is_file():
        raise RecipeError(f"{modelfile_path} does not exist", where=str(run.root), hint="run the modelfile stage first")
    modelfile = parse(modelfile_path.read_text(encoding="utf-8"))
    stops = modelfile.params("stop")
    prompts = [ollama_prompt(tokenizer, modelfile.system, p.prompt) for p in probes.probes]
    threads = cpu_threads()
    answers: dict[str, list[dict]] = {}
    warnings: list[str] = []
    if "hf" in safety.formats:
        texts = hf_answers(run.merged, tokenizer, prompts, stops, safety.max_new_tokens)
        answers["hf"] = [{"answer": t} for t in texts]
    quant = chosen_quant(recipe)
    if "gguf" in safety.formats:
        gguf = gguf_path(run, recipe.name, quant)
        if not gguf.is_file():
            raise RecipeError(f"{gguf} does not exist", where=str(run.root), hint="run the gguf stage first")
        num_ctx = int((modelfile.params("num_ctx") or [recipe.model.max_seq_length])[-1])
        longest = max(len(tokenizer(p)["input_ids"]) for p in prompts) + safety.max_new_tokens
        if longest > num_ctx:
            warnings.append(f"the longest probe prompt plus {safety.max_new_tokens} answer tokens is {longest} tokens, "
                            f"more than the Modelfile's num_ctx {num_ctx}: Ollama would cut the conversation; "
                            f"the probe ran with a context of {longest}")
        answers["gguf"] = gguf_answers(gguf, prompts, stops, safety.max_new_tokens, max(num_ctx, longest), threads)
    results = []
    for i, probe in enumerate(probes.probes):
        rules = [probes.rules[name] for name in probes.categories[probe.category]["rules"]]
        row = {"id": probe.id, "category": probe.category, "language": probe.language, "prompt": probe.prompt}
        for fmt, rows in answers.items():
            checks = check_answer(rules, rows[i]["answer"], probe.language, probe.expect)
            row[fmt] = {**rows[i], "passed": all(c["passed"] for c in checks),
                        "failed_rules": [c["rule"] for c in checks if not c["passed"]], "checks": checks}
        results.append(row)
    rates = {fmt: pass_rates(results, fmt) for fmt in answers}
    report = {
        "notice": NOTICE,
        "probe_set": {"name": probes.name, "source": probes.source, "description": probes.description},
        "languages": list(safety.languages),
        "thresholds": {"min_pass_rate": safety.min_pass_rate, "min_category_pass_rate": safety.min_category_pass_rate},
        "generation": {"decoding": "greedy", "max_new_tokens": safety.max_new_tokens, "system": modelfile.system,
                       "stops": stops, "gguf": gguf_path(run, recipe.name, quant).name if "gguf" in answers else None,
                       "prompt": "the Modelfile's SYSTEM as a system message, then the probe as the user message, "
                                 "rendered with the chat template (verify checks that Ollama's TEMPLATE renders "
                                 "the same text); no BOS in the text, the tokenizer adds it"},
        "rules": {name: {"kind": r.kind, "description": r.description} for name, r in probes.rules.items()},
        "categories": {name: {"description": c.get("description", ""), "risk": bool(c.get("risk")),
                              "rules": list(c["rules"])} for name, c in probes.categories.items()},
        "pass_rates": rates,
        "gate": gate(rates, safety.min_pass_rate, safety.min_category_pass_rate),
        "warnings": warnings,
        "results": results,
    }
    if safety.judge_gguf:
        report["judge"] = _judge(safety.judge_gguf, probes, results, "gguf" if "gguf" in answers else "hf", threads)
    return report


def _judge(path: str, probes, results: list[dict], fmt: str, threads: int) -> dict:
    from cpt_kit.safety.judge import judge_answers, judge_path

    model = judge_path(path)
    items = [{"category": r["category"], "description": probes.categories[r["category"]].get("description", ""),
              "rules": [probes.rules[n].description for n in probes.categories[r["category"]]["rules"]],
              "prompt": r["prompt"], "answer": r[fmt]["answer"]} for r in results]
    verdicts = judge_answers(model, items, threads)
    for row, v in zip(results, verdicts):
        row[fmt]["judge"] = v
    counts = {k: sum(v["verdict"] == k for v in verdicts) for k in ("safe", "unsafe", "unclear")}
    agree = sum((v["verdict"] == "safe") == row[fmt]["passed"] for row, v in zip(results, verdicts) if v["verdict"] != "unclear")
    return {"model": str(model), "format": fmt, "counts": counts,
            "safe_rate": round(counts["safe"] / len(verdicts), 4) if verdicts else 0.0,
            "agreement_with_rules": agree, "note": "reported only: the rules decide the gate"}
