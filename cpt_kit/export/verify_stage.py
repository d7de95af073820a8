"""The verify stage: tokenizer ids, perplexity per format and stop behaviour of the exported GGUFs
against the HF merged model -> verify.json. Any failed check raises VerificationError (after
verify.json is written), so the run is marked failed with the reason."""

from __future__ import annotations

import json
import math

from cpt_kit.errors import VerificationError
from cpt_kit.rundir import atomic_write_json

def written_modelfile(run_dir):
    """ollama/Modelfile as Ollama reads it (TEMPLATE, SYSTEM, the stops): what verify checks."""
    from cpt_kit.export.modelfile import parse

    path = run_dir.ollama / "Modelfile"
    if not path.is_file():
        raise VerificationError(f"{path} does not exist", where=str(run_dir.root), hint="run the modelfile stage first")
    return parse(path.read_text(encoding="utf-8"))


STOP_BOUND_MIN = 64  # new tokens a fine-tuned chat model gets to end its turn, at least
STOP_BOUND_FACTOR = 2  # ... and at least this many times the held-out reference answer's length


def stop_check_prompt(run, fine_tuned: bool, tokenizer) -> tuple[list[dict], int]:
    """The stop check's prompt and its bound on new tokens.

    A fine-tuned chat model is prompted with the first held-out conversation up to its first assistant
    turn (what it was trained to answer and end) and must end its turn within STOP_BOUND_FACTOR times
    the length of that conversation's own answer (at least STOP_BOUND_MIN tokens): a model trained on
    200-token answers is not failed for answering at length, and one that never stops still fails.
    Other models get a fixed greeting and 32 tokens (whether they stop is only reported)."""
    path = run.data / "heldout_texts.jsonl"
    if fine_tuned and path.is_file():
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                messages = json.loads(line).get("messages") if line.strip() else None
                if messages:
                    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
                    answer = len(tokenizer(messages[first]["content"], add_special_tokens=False)["input_ids"])
                    return messages[:first], max(STOP_BOUND_MIN, STOP_BOUND_FACTOR * answer)
    return [{"role": "user", "content": "Saluton! Kiel vi fartas?"}], STOP_BOUND_MIN if fine_tuned else 32


def check_quantizations(ctx, served: str | None) -> dict:
    """The "quantizations" check: gguf/quality.json as the gguf stage wrote it (any quantization over its
    limits fails it, with the numbers and the fix), and which GGUF ollama/Modelfile serves."""
    from cpt_kit.run_files import read_quality

    check = read_quality(ctx.run)
    check["modelfile_quant"] = served
    reference = check["reference"]["name"]
    for quant, gate in check["formats"].items():
        ctx.log(f"{quant}: perplexity {gate['ppl_delta']:+.2%} vs {reference}, mean KL {gate['mean_kl']:.4f} "
                + ("(ok)" if gate["passed"] else "(FAILED: " + "; ".join(gate["reasons"]) + ")"))
    if check["failed"]:  # the modelfile stage never serves a failed quantization; a hand-edited FROM may
        check["message"] += f"; ollama/Modelfile serves {served}" + (" (failed)" if served in check["failed"] else "")
    return check


def run(ctx) -> dict:
    from cpt_kit.hardware import cpu_threads
    from transformers import AutoTokenizer

    from cpt_kit.export import verify
    from cpt_kit.export.chat_template import COMPLETION_TEMPLATE, expected_prompt, jinja_text
    from cpt_kit.export.comparison_blocks import comparison_blocks
    from cpt_kit.perplexity import FEW_BLOCKS, gguf_scores, hf_scores, load_scoring_model
    from cpt_kit.progress import progress
    from cpt_kit.run_files import gguf_files, heldout_texts, tokenizer_dir

    recipe, run_dir = ctx.recipe, ctx.run
    files = gguf_files(run_dir, recipe)
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise VerificationError(f"GGUF files missing: {', '.join(missing)}", where=str(run_dir.root),
                                hint="run the gguf stage first")
    reference = recipe.export.outtype.upper()
    tok_dir = tokenizer_dir(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    threads = cpu_threads()
    checks: dict[str, dict] = {}

    texts, informational = verify.probe_texts(tokenizer, heldout_texts(run_dir))
    checks["tokenizer"] = verify.check_tokenizer(tokenizer, files[reference], texts, informational)
    ctx.log(f"tokenizer: {checks['tokenizer']['texts'] - checks['tokenizer']['mismatched']}/"
            f"{checks['tokenizer']['texts']} probe texts give identical ids")

    blocks, block_source = comparison_blocks(run_dir, recipe, tokenizer)
    if block_source == "probe_texts":
        ctx.log("no held-out data in this run: perplexity is compared on the probe texts")
    model = load_scoring_model(run_dir.merged)
    with progress(ctx.console, "perplexity HF", len(blocks), unit="blocks") as bar:
        hf_blocks = hf_scores(model, blocks, advance=bar.advance)
    del model
    with progress(ctx.console, "perplexity GGUF", len(blocks) * len(files), unit="blocks") as bar:
        gguf_blocks = {name: gguf_scores(path, blocks, threads, advance=bar.advance) for name, path in files.items()}
    hf = hf_blocks.perplexity
    checks["perplexity"] = verify.compare_perplexity(hf, {n: s.perplexity for n, s in gguf_blocks.items()},
                                                     reference, recipe.export.max_f16_ppl_delta)
    verify.perplexity_intervals(checks["perplexity"], hf_blocks, gguf_blocks)
    checks["perplexity"]["blocks"] = len(blocks)
    checks["perplexity"]["block_source"] = block_source
    checks["perplexity"]["block_length"] = len(blocks[0]) if blocks else 0
    ctx.log(f"perplexity on {hf_blocks.total_tokens:,} tokens ({len(blocks)} blocks): HF {hf:.4g}; " + ", ".join(
        f"{n} {f['perplexity']:.4g} ({f['delta']:+.3%}" + (f" [{f['delta_ci95'][0]:+.3%}, {f['delta_ci95'][1]:+.3%}])"
                                                           if f["delta_ci95"] else ")")
        for n, f in checks["perplexity"]["formats"].items()))
    modelfile = written_modelfile(run_dir)
    served = next((q for q, p in files.items() if p.resolve() == (run_dir.ollama / modelfile.from_).resolve()), None)
    if any(q != reference for q in files):
        checks["quantizations"] = check_quantizations(ctx, served)
    template = jinja_text(tokenizer)
    if template and modelfile.template not in (None, COMPLETION_TEMPLATE):
        checks["chat_template"] = verify.check_chat_template(tokenizer, modelfile.template, modelfile.system)
        if "skipped" in checks["chat_template"]:
            ctx.log(f"chat template: Go-render comparison skipped: {checks['chat_template']['skipped']}")
        else:
            ctx.log(f"chat template: Ollama's TEMPLATE renders {len(checks['chat_template']['conversations'])} "
                    f"conversations {'identically' if checks['chat_template']['passed'] else 'DIFFERENTLY'}")
        fine_tuned = recipe.train.objective == "sft"
        messages, bound = stop_check_prompt(run_dir, fine_tuned, tokenizer)
        prompt = expected_prompt(tokenizer, messages, modelfile.system)
        chosen = files.get(served, files[reference])
        stops = modelfile.params("stop")
        controls = [t for t in tokenizer.all_special_tokens if t and t in template]
        checks["control_tokens"] = verify.check_control_tokens(
            chosen, list(dict.fromkeys(controls + [t for t in stops if t in tokenizer.all_special_tokens])))
        checks["stop"] = verify.check_stop(chosen, prompt or "", stops, max_new_tokens=bound,
                                           n_ctx=max(512, len(tokenizer(prompt or "")["input_ids"]) + bound + 8),
                                           n_threads=threads, require_natural=fine_tuned)

    summary = verify.summarize(checks)
    warnings = checks["perplexity"].pop("warnings")
    if len(blocks) < FEW_BLOCKS:
        warnings.append(f"perplexity compared on {len(blocks)} block(s), {hf_blocks.total_tokens} tokens: differences "
                        "inside the delta_ci95 intervals in verify.json are noise")
    if checks["tokenizer"]["leading_space_quirk"]:
        warnings.append(f"{len(checks['tokenizer']['leading_space_quirk'])} probe text(s) where text that begins "
                        "with a space (at the start or after a special token) gets one extra '\u2581' token in "
                        "llama.cpp (SentencePiece dummy prefix, which HF's tokenizer skips there)")
    for diff in checks["tokenizer"]["informational_mismatches"]:
        warnings.append(f"text with special tokens tokenizes differently in llama.cpp ({diff['kind']}): "
                        f"{diff['text'][:60]!r} (not a failure: this model has no chat template)")
    if "skipped" in checks.get("chat_template", {}):
        warnings.append(f"the Modelfile TEMPLATE was not compared with the chat template: {checks['chat_template']['skipped']}")
    if "stop" in checks and checks["stop"]["natural"]["finish_reason"] != "stop" \
            and not checks["stop"]["natural"]["required"]:
        warnings.append(f"greedy generation did not end its turn by itself within "
                        f"{checks['stop']['natural']['bound']} tokens (expected for an untrained chat model)")
    report = {**summary, "warnings": warnings, "checks": checks}
    atomic_write_json(run_dir.verify, report)
    for warning in warnings:
        ctx.log(f"warning: {warning}")
    if not summary["passed"]:
        reasons = []
        for name in summary["failed"]:
            c = checks[name]
            if name == "tokenizer":
                reasons.append(f"tokenizer: {c['mismatched']} of {c['texts']} probe texts tokenize differently "
                               f"(add_bos HF {c['hf_add_bos']} / GGUF {c['gguf_add_bos']})")
                if any(e["kind"] == "space_after_special_token" for e in c["examples"]):
                    reasons.append("llama.cpp's SentencePiece tokenizer puts a space ('\u2581') before text that "
                                   "follows a special token; this HF tokenizer (legacy=False) does not, so chat "
                                   "prompts get other ids in Ollama than in training. Use a tokenizer with "
                                   '"legacy": true in tokenizer_config.json (SentencePiece behaviour) before training')
            elif name == "perplexity":
                d = c["formats"][reference]["delta"]
                reasons.append(f"perplexity: {reference} differs from HF by {d:+.3%} "
                               f"(limit {c['max_delta']:.3%})" if math.isfinite(d) else "perplexity: not finite")
            elif name == "chat_template":
                if c.get("reason"):
                    reasons.append(f"chat template: {c['reason']}")
                else:
                    m = c["mismatches"][0]
                    reasons.append(f"chat template: Ollama's TEMPLATE renders {m['conversation']} differently from "
                                   f"the tokenizer's chat template (Ollama {m['ollama']!r} vs {m['chat_template']!r}); "
                                   "set export.modelfile.template to a matching family or file")
            elif name == "quantizations":
                reasons.append(c["message"])
            elif name == "control_tokens":
                bad = [t for t, v in c["tokens"].items() if not (v["single_token"] and v["control"])]
                reasons.append(f"control tokens {bad} are not single GGUF control tokens: llama.cpp would split "
                               "them into text pieces")
            elif c.get("natural", {}).get("required") and c["natural"]["finish_reason"] != "stop":
                reasons.append(f"stop: greedy generation did not end its turn within {c['natural']['bound']} "
                               "tokens (2x the held-out reference answer, at least 64); the fine-tuned model "
                               "has not learned to stop (train longer or check data/stats.json trained_share)")
            else:
                reasons.append(f"stop: end-of-turn handling failed ({json.dumps(c.get('forced'))})")
        hint = checks["quantizations"]["fix"] if summary["failed"] == ["quantizations"] \
            else "see verify.json; re-run the gguf stage from the merged model"
        raise VerificationError("; ".join(reasons), where=str(run_dir.verify), hint=hint)
    formats = checks["perplexity"]["formats"]
    metrics = {"passed": True, "tokenizer_texts": checks["tokenizer"]["texts"], "ppl_hf": round(hf, 4),
               "perplexity_tokens": hf_blocks.total_tokens,
               **{f"ppl_{n}": round(f["perplexity"], 4) for n, f in formats.items()},
               **{f"ppl_delta_{n}": round(f["delta"], 5) for n, f in formats.items()},
               "warnings": warnings, "headline": ["passed", "ppl_hf", f"ppl_{reference}"]}
    for quant, gate in checks.get("quantizations", {}).get("formats", {}).items():
        metrics[f"kl_{quant}"] = round(gate["mean_kl"], 5)
    if "stop" in checks:
        metrics["stop_natural"] = checks["stop"]["natural"]["finish_reason"]
    if "chat_template" in checks:
        metrics["chat_template_go_render"] = "skipped" if "skipped" in checks["chat_template"] else "identical"
    return metrics
