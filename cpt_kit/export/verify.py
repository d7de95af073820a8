"""Checks that the exported GGUFs behave like the trained HF model. Each returns a dict with
`passed` and the numbers behind it; verify_stage writes them to verify.json.

- tokenizer: HF ids == llama.cpp ids (`Llama(vocab_only=True).tokenize(text, add_bos, special=True)`)
  on held-out documents, target-language probes and special-token / chat-template texts.
- perplexity: token-weighted perplexity of the same held-out token blocks for the HF model and
  every GGUF (`cpt_kit.perplexity`, chunked over the sequence), with token counts and 95%
  intervals; F16 must be within max_f16_ppl_delta.
- quantizations: each quantized GGUF's KL divergence and perplexity change vs the F16 GGUF within its
  own limits, as the gguf stage measured and gated them (`gguf/quality.json`; `quant_quality`,
  `quant_gate`); verify_stage reads that file.
- chat_template (chat models): the Modelfile TEMPLATE, rendered by Go's text/template as Ollama does
  (SYSTEM prepended), gives the same prompt as the tokenizer's chat template on several
  conversations; skipped, and said so, without a Go toolchain.
- control_tokens (chat models): every special token the chat template writes is ONE GGUF token of
  type control.
- stop (chat models): every end-of-turn token is a single end-of-generation (EOG) token in the GGUF
  vocabulary, and greedy generation from a rendered chat prompt halts exactly when it is produced
  (forced by a logits processor after a few free tokens, because a tiny or CPT-only model need
  not emit it by itself); whether the model stops on its own within the bound is reported.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

LANGUAGE_PROBES = (
    "Ĉu vi ŝatas ĝin? Ĥoro, ĵaŭdo, aŭto: ĈĜĤĴŜŬ ĉĝĥĵŝŭ.",
    "Eĥoŝanĝo ĉiuĵaŭde; la ŭ en 'aŭ' kaj 'eŭ'.",
    "café naïve Zürich façade à é î õ ü ñ ß œ — “quotes” ‘single’ …",
    "Numbers 0123456789, 3.14159, 2026-11-26, 1 000 000 and 42%.",
    "multiple   spaces,    tabs\tand\t\ttabs",
    "line one\nline two\n\n\nafter blank lines\n",
    "   leading and trailing spaces   ",
    "emoji 🙂 and CJK 漢字 and Cyrillic Привет",
)


def gguf_add_bos(llm) -> bool:
    import llama_cpp
    return bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model)))


def probe_texts(tokenizer, heldout_texts: Sequence[str], max_docs: int = 8,
                max_chars: int = 2000) -> tuple[list[str], list[str]]:
    """(texts that must tokenize identically, texts recorded but not failing).

    Must match: held-out documents (first `max_chars`), language probes and, for chat models, a
    rendered multi-turn conversation plus texts mixing the special tokens. For a model without a
    chat template the special-token texts are only informational: Ollama sends raw prompts, which
    do not contain special tokens.
    """
    from cpt_kit.bos import runner_prompt
    from cpt_kit.export.chat_template import render

    texts = [t[:max_chars] for t in list(heldout_texts)[:max_docs] if t.strip()]
    texts += list(LANGUAGE_PROBES)
    specials = [t for t in tokenizer.all_special_tokens if t]
    special_texts = []
    if specials:
        special_texts.append("start " + " middle ".join(specials) + " end")
        special_texts.append("".join(specials) + "Saluton")
    if not getattr(tokenizer, "chat_template", None):
        return texts, special_texts
    messages = [{"role": "system", "content": "Vi estas helpema asistanto."},
                {"role": "user", "content": "Kiel vi fartas hodiaŭ?"},
                {"role": "assistant", "content": "Bone, dankon! Kaj vi?"},
                {"role": "user", "content": "Ankaŭ bone."}]
    try:
        rendered = render(tokenizer, messages)
    except Exception:  # templates without a system role
        rendered = render(tokenizer, messages[1:])
    return texts + special_texts + [runner_prompt(tokenizer, rendered)], []


def _compare(tokenizer, llm, text: str, add_bos: bool) -> Optional[dict]:
    """None when ids are equal; else the difference, with `kind` (see leading_space_quirk)."""
    from llama_cpp._utils import suppress_stdout_stderr

    hf = list(tokenizer(text)["input_ids"])
    with suppress_stdout_stderr(disable=False):  # llama.cpp warns on stderr about probes that start with BOS
        gg = list(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))
    if hf == gg:
        return None
    first = next((i for i, (a, b) in enumerate(zip(hf, gg)) if a != b), min(len(hf), len(gg)))
    kind = "leading_space_quirk" if leading_space_quirk(tokenizer, text, hf, gg, int(add_bos)) else "different"
    if kind == "different" and first > 0 and gg[first - 1] in set(tokenizer.all_special_ids) \
            and first < len(gg) and tokenizer.convert_ids_to_tokens(gg[first]).startswith("\u2581") \
            and not (first < len(hf) and tokenizer.convert_ids_to_tokens(hf[first]).startswith("\u2581")):
        kind = "space_after_special_token"
    return {"text": text[:200], "kind": kind, "first_difference": first, "hf": hf[first:first + 8],
            "gguf": gg[first:first + 8], "hf_len": len(hf), "gguf_len": len(gg)}


def check_tokenizer(tokenizer, gguf: Path, texts: Sequence[str], informational: Sequence[str] = ()) -> dict:
    from llama_cpp import Llama

    from llama_cpp._utils import suppress_stdout_stderr

    from cpt_kit.bos import adds_bos

    with suppress_stdout_stderr(disable=False):  # "n_ctx_train (0)" note of a vocab-only load
        llm = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    add_bos = gguf_add_bos(llm)
    diffs = [d for d in (_compare(tokenizer, llm, t, add_bos) for t in texts) if d]
    mismatches = [d for d in diffs if d["kind"] != "leading_space_quirk"]
    info = [d for d in (_compare(tokenizer, llm, t, add_bos) for t in informational) if d]
    hf_bos = adds_bos(tokenizer)
    return {"passed": not mismatches and hf_bos == add_bos, "gguf": gguf.name, "texts": len(texts),
            "mismatched": len(mismatches), "leading_space_quirk": [d["text"] for d in diffs if d not in mismatches],
            "informational_mismatches": info, "hf_add_bos": hf_bos, "gguf_add_bos": add_bos,
            "hf_vocab": len(tokenizer), "gguf_vocab": llm.n_vocab(), "examples": mismatches[:5]}


def leading_space_quirk(tokenizer, text: str, hf: list[int], gg: list[int], start: int) -> bool:
    """The one known difference that is not an export error: where a text fragment (the text's start,
    or text right after a special token) itself begins with a space, HF's Metaspace pre-tokenizer
    adds no SentencePiece dummy prefix, while llama.cpp (like sentencepiece) still adds one: llama.cpp
    then has one extra "\u2581" token there and is otherwise identical. An extra "\u2581" before a
    fragment that does NOT begin with a space (legacy=False tokenizers after special tokens) is a
    real difference and is not excused."""
    space = tokenizer.convert_tokens_to_ids("\u2581")
    specials = set(tokenizer.all_special_ids)
    if space is None or space == tokenizer.unk_token_id or hf[:start] != gg[:start]:
        return False
    i, j, skipped = start, start, 0
    while i < len(gg) and j < len(hf):
        if gg[i] == space and (i == start or gg[i - 1] in specials) and (i + 1 < len(gg) and gg[i + 1] == hf[j]) \
                and tokenizer.convert_ids_to_tokens(hf[j]).startswith("\u2581"):
            i, skipped = i + 1, skipped + 1
        elif gg[i] == hf[j]:
            i, j = i + 1, j + 1
        else:
            return False
    return i == len(gg) and j == len(hf) and skipped > 0


def check_chat_template(tokenizer, template: str, system: Optional[str]) -> dict:
    """Ollama's prompt (Go text/template over TEMPLATE, SYSTEM prepended) == the HF chat template's
    prompt (as the runner receives it) on the probe conversations the HF template accepts."""
    from cpt_kit.export import ollama_render
    from cpt_kit.export.chat_template import PROBES, expected_prompt

    if not ollama_render.available():
        return {"passed": True, "skipped": ollama_render.NO_GO}
    compared, mismatches = [], []
    for name, messages in PROBES.items():
        expected = expected_prompt(tokenizer, messages, system)
        if expected is None:
            continue
        got = ollama_render.render(template, messages, system or "")
        compared.append(name)
        if got != expected:
            first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            mismatches.append({"conversation": name, "first_difference": first,
                               "ollama": got[max(0, first - 40):first + 80],
                               "chat_template": expected[max(0, first - 40):first + 80]})
    result = {"passed": bool(compared) and not mismatches, "conversations": compared, "mismatches": mismatches,
              "system": system}
    if not compared:
        result["reason"] = ("the chat template rejects every probe conversation with the Modelfile's SYSTEM (it does "
                            "not accept a system message): remove export.modelfile.system")
    return result


def perplexity_intervals(check: dict, hf, ggufs: dict) -> dict:
    """Token counts and 95% intervals (`cpt_kit.perplexity` BlockScores) added to compare_perplexity's result:
    the HF perplexity's interval, each format's and each format's paired delta vs HF."""
    from cpt_kit.perplexity import paired_change

    check.update(tokens=hf.total_tokens, hf_ci95=hf.report()["ci95"])
    for name, scores in ggufs.items():
        change = paired_change(hf, scores)
        check["formats"][name].update(
            tokens=scores.total_tokens, ci95=scores.report()["ci95"],
            delta_ci95=[c / 100.0 for c in change["ci95"]] if change["ci95"] else None)
    return check


def compare_perplexity(hf: float, ggufs: dict[str, float], reference: str, max_delta: float) -> dict:
    """{"hf", "formats": {name: {"perplexity", "delta"}}, "passed"}; only `reference` (F16) can fail."""
    formats, warnings = {}, []
    for name, value in ggufs.items():
        delta = (value - hf) / hf if math.isfinite(value) and math.isfinite(hf) else float("nan")
        formats[name] = {"perplexity": value, "delta": delta}
        if not math.isfinite(value):
            warnings.append(f"{name} perplexity is {value}")
    ref = formats.get(reference, {}).get("delta", float("nan"))
    passed = math.isfinite(hf) and math.isfinite(ref) and abs(ref) <= max_delta
    order = sorted(formats, key=lambda n: abs(formats[n]["delta"]) if math.isfinite(formats[n]["delta"]) else math.inf)
    return {"passed": passed, "hf": hf, "reference": reference, "max_delta": max_delta,
            "formats": formats, "order_by_abs_delta": order, "warnings": warnings}


def check_stop(gguf: Path, prompt_text: str, eot_tokens: Sequence[str], max_new_tokens: int = 32,
               forced_after: int = 3, n_threads: Optional[int] = None, require_natural: bool = False,
               n_ctx: int = 512) -> dict:
    """require_natural (fine-tuned chat models): greedy generation must also end its turn by itself within
    max_new_tokens (capped by what the n_ctx-token context leaves after the prompt)."""
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):  # context-size notes llama.cpp prints even with verbose=False
        llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=n_threads, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    add_bos = gguf_add_bos(llm)
    prompt = llm.tokenize(prompt_text.encode("utf-8"), add_bos=add_bos, special=True)
    max_new_tokens = min(max_new_tokens, llm.n_ctx() - len(prompt))
    bos = llm.token_bos()
    double_bos = len(prompt) >= 2 and prompt[0] == bos and prompt[1] == bos
    tokens = {}
    for text in eot_tokens:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        tokens[text] = {"ids": ids, "single_token": len(ids) == 1,
                        "is_eog": len(ids) == 1 and bool(llama_cpp.llama_vocab_is_eog(vocab, ids[0]))}
    eot = next((t for t in eot_tokens if tokens[t]["is_eog"]), None)
    greedy = dict(max_tokens=max_new_tokens, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
    natural = llm.create_completion(prompt, **greedy)
    result = {"gguf": gguf.name, "prompt_tokens": len(prompt), "double_bos": double_bos, "eot_tokens": tokens,
              "natural": {"finish_reason": natural["choices"][0]["finish_reason"],
                          "tokens": natural["usage"]["completion_tokens"], "bound": max_new_tokens}}
    if eot is not None:
        eot_id = tokens[eot]["ids"][0]

        def force_eot(input_ids, scores):
            if len(input_ids) - len(prompt) >= forced_after:
                scores = np.full_like(scores, -np.inf)
                scores[eot_id] = 0.0
            return scores

        forced = llm.create_completion(prompt, logits_processor=llama_cpp.LogitsProcessorList([force_eot]), **greedy)
        choice = forced["choices"][0]
        result["forced"] = {"token": eot, "after": forced_after, "finish_reason": choice["finish_reason"],
                            "tokens": forced["usage"]["completion_tokens"], "eot_text_in_output": eot in choice["text"]}
    forced_ok = "forced" in result and result["forced"]["finish_reason"] == "stop" \
        and result["forced"]["tokens"] <= forced_after and not result["forced"]["eot_text_in_output"]
    natural_ok = result["natural"]["finish_reason"] == "stop" or not require_natural
    result["natural"]["required"] = require_natural
    result["passed"] = bool(forced_ok and natural_ok and all(t["single_token"] and t["is_eog"] for t in tokens.values())
                            and not double_bos)
    del llm
    return result


def check_control_tokens(gguf: Path, tokens: Sequence[str]) -> dict:
    """Each chat-template control token, written in a prompt, must be ONE token of GGUF type control
    (else llama.cpp splits `<|im_end|>` into text pieces and Ollama never sees the end of a turn)."""
    import llama_cpp
    from llama_cpp import Llama
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):
        llm = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    found = {}
    for text in tokens:
        ids = llm.tokenize(("a" + text + "b").encode("utf-8"), add_bos=False, special=True)
        own = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        control = len(own) == 1 and bool(llama_cpp.llama_vocab_get_attr(vocab, own[0])
                                          & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL)
        found[text] = {"ids": own, "single_token": len(own) == 1 and own[0] in ids, "control": control}
    del llm
    return {"passed": all(t["single_token"] and t["control"] for t in found.values()), "gguf": gguf.name,
            "tokens": found}


def summarize(checks: dict[str, dict]) -> dict[str, Any]:
    failed = [name for name, c in checks.items() if not c.get("passed", False)]
    return {"passed": not failed, "failed": failed}
