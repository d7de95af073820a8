"""The report's "How good is it" (perplexities, base vs trained and per exported format) and "Export
verification" (each check of verify.json with its key numbers, and verify's warnings) sections."""

from __future__ import annotations

from typing import Any, Callable

from cpt_kit.report.facts import Facts
from cpt_kit.report.render import Block, Bullets, Heading, Table, Text, fmt, percent

EVALUATE_ROWS = (  # metric, label, the metric prefix of its change against the base model
    ("ppl_base", "held-out text, base model", None),
    ("ppl_trained", "held-out text, trained model", "ppl_change"),
    ("replay_ppl_base", "replay (general) text, base model", None),
    ("replay_ppl_trained", "replay (general) text, trained model", "replay_ppl_change"),
)


def perplexities(facts: Facts) -> list[Block]:
    ev = facts.metrics("evaluate")
    rows = []
    for key, label, change in EVALUATE_ROWS:
        if key not in ev:
            continue
        tokens = ev.get("replay_tokens" if key.startswith("replay") else "heldout_tokens")
        moved = (f"{ev[change + '_pct']:+.4g}% ({ev.get(change + '_ci95', '')}) vs base"
                 if change and change + "_pct" in ev else "")
        rows.append((label, fmt(ev[key]), interval(ev.get(key + "_ci")), _count(tokens), moved))
    for name, scored in facts.format_perplexities().items():
        label = ("merged HF model (transformers), verify's blocks" if name == "HF"
                 else f"exported {name} GGUF (llama.cpp)")
        delta = scored.get("delta")
        rows.append((label, fmt(scored["perplexity"]), interval(scored["ci95"]), _count(scored["tokens"]),
                     f"{percent(delta)} vs merged HF" if isinstance(delta, (int, float)) else ""))
    if not rows:
        return []
    return [Heading("How good is it"),
            Table(("perplexity on", "value", "95% interval", "tokens", "change"), tuple(rows)),
            Text("Lower is better. *change*: the trained model against the base model on the same text; an exported "
                 "GGUF against the merged HF model on the same blocks (what conversion and quantization cost).")]


def interval(value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"{fmt(value[0])} - {fmt(value[1])}"
    return ""


def _count(value: Any) -> str:
    return fmt(value) if value is not None else ""


def verification(facts: Facts) -> list[Block]:
    verify = facts.verify
    if not verify:
        return []
    failed = verify.get("failed") or []
    blocks: list[Block] = [
        Heading("Export verification"),
        Text("The exported GGUF files checked against the merged HF model (`verify.json`): "
             f"**{'passed' if verify.get('passed') else 'FAILED'}**"
             + (f" ({', '.join(failed)} failed)" if failed else "") + "."),
        Table(("check", "result", "key numbers"), tuple(
            (name.replace("_", " "), "passed" if check.get("passed") else "FAILED", check_numbers(name, check))
            for name, check in facts.verify_checks().items()))]
    if verify.get("warnings"):
        blocks += [Text("Warnings:"), Bullets(tuple(verify["warnings"]))]
    return blocks


def check_numbers(name: str, check: dict[str, Any]) -> str:
    """One line of a verify check's numbers, as a reader needs them."""
    from cpt_kit.summary import headline_metrics

    describe = CHECKS.get(name)
    return describe(check) if describe else headline_metrics(check)


def _tokenizer(c: dict) -> str:
    texts, mismatched = c.get("texts", 0), c.get("mismatched", 0)
    return (f"{fmt(texts - mismatched)}/{fmt(texts)} probe texts give the same token ids in llama.cpp as in "
            f"transformers; vocabulary {fmt(c.get('hf_vocab'))} / {fmt(c.get('gguf_vocab'))}, BOS added "
            f"{fmt(c.get('hf_add_bos'))} / {fmt(c.get('gguf_add_bos'))} (HF / GGUF)")


def _perplexity(c: dict) -> str:
    reference = c.get("reference", "F16")
    delta = c.get("formats", {}).get(reference, {}).get("delta")
    return (f"{reference} GGUF {percent(delta) if isinstance(delta, (int, float)) else '?'} vs merged HF "
            f"(limit {fmt(c.get('max_delta', 0) * 100)}%) on {fmt(c.get('tokens'))} tokens "
            f"({fmt(c.get('blocks'))} {c.get('block_source', '')} blocks)")


def _quantizations(c: dict) -> str:
    reference = c.get("reference", {}).get("name", "F16")
    parts = [f"{quant}: perplexity {percent(g['ppl_delta'])} vs {reference} (limit {fmt(g['max_ppl_delta'] * 100)}%), "
             f"mean KL {fmt(g['mean_kl'])} (limit {fmt(g['max_kl'])}), same top token {fmt(g['same_top_token'] * 100)}%"
             for quant, g in c.get("formats", {}).items()]
    if c.get("modelfile_quant"):
        parts.append(f"ollama/Modelfile serves {c['modelfile_quant']}")
    if c.get("message"):
        parts.append(c["message"])
    return "; ".join(parts)


def _chat_template(c: dict) -> str:
    if "skipped" in c:
        return f"not compared: {c['skipped']}"
    conversations = c.get("conversations", [])
    if c.get("passed"):
        return (f"{len(conversations)} conversations ({', '.join(conversations)}) render the same through the "
                "Modelfile's TEMPLATE (Ollama) as through the tokenizer's chat template")
    return c.get("reason") or f"{', '.join(m['conversation'] for m in c.get('mismatches', []))} render differently"


def _control_tokens(c: dict) -> str:
    tokens = c.get("tokens", {})
    good = [t for t, v in tokens.items() if v.get("single_token") and v.get("control")]
    bad = [t for t in tokens if t not in good]
    return "; ".join(([f"{', '.join(good)}: single control tokens in the GGUF"] if good else [])
                     + ([f"{', '.join(bad)}: NOT single control tokens"] if bad else []))


def _stop(c: dict) -> str:
    natural, forced = c.get("natural", {}), c.get("forced") or {}
    text = (f"answering greedily it ended its turn by itself after {fmt(natural.get('tokens'))} tokens"
            if natural.get("finish_reason") == "stop" else "answering greedily it did not end its turn")
    text += f" (limit {fmt(natural.get('bound'))}, {'required' if natural.get('required') else 'not required'})"
    if forced:
        ended = forced.get("finish_reason") == "stop" and not forced.get("eot_text_in_output")
        text += (f"; {forced.get('token')} forced after {fmt(forced.get('after'))} tokens "
                 f"{'ends' if ended else 'does NOT end'} it")
    return text


CHECKS: dict[str, Callable[[dict], str]] = {
    "tokenizer": _tokenizer, "perplexity": _perplexity, "quantizations": _quantizations,
    "chat_template": _chat_template, "control_tokens": _control_tokens, "stop": _stop,
}
