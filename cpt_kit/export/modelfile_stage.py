"""The modelfile stage: `ollama/Modelfile` (FROM the chosen GGUF by relative path, TEMPLATE, stops,
SYSTEM, sampling parameters), optionally `ollama/Modelfile.adapter`, then `ollama create` if possible
(for a chat model, train.objective="sft", the safety stage does that once its gate passed).

FROM is the recipe's quantization when it passed its quality limits (gguf/quality.json, written by the
gguf stage), else the smallest quantization that passed, else the unquantized GGUF: never a failed one."""

from __future__ import annotations

import os
from pathlib import Path

from cpt_kit.errors import ExportError
from cpt_kit.run_files import chosen_quant, eos_ids, tokenizer_dir
from cpt_kit.rundir import RunDir, atomic_write_text

def _number(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def trained_system_prompt(recipe):
    """The system prompt an SFT recipe put into every training conversation (Ollama's SYSTEM must match)."""
    return recipe.sft.system_prompt if recipe.train.objective == "sft" else None


def build_modelfile(recipe, run: RunDir, tokenizer, from_path: str):
    """(Modelfile, ChatTemplateInfo) for `recipe`; `from_path` is relative to run.ollama."""
    from cpt_kit.export.chat_template import PROBES, expected_prompt, inspect_tokenizer, jinja_text
    from cpt_kit.export.modelfile import Modelfile

    spec = recipe.export.modelfile
    info = inspect_tokenizer(tokenizer, spec.template, eos_ids(tokenizer_dir(run)))
    if spec.system and info.family != "completion" and jinja_text(tokenizer) \
            and expected_prompt(tokenizer, PROBES["one_turn"], spec.system) is None:
        raise ExportError("the chat template rejects a system message, so the model never saw one in training; "
                          "Ollama would still send SYSTEM to it", where="export.modelfile.system",
                          hint="leave export.modelfile.system unset for this model (or put the text in the first "
                               "user message of your prompts)")
    params = [("stop", s) for s in dict.fromkeys([*info.stops, *spec.extra_stops])]
    for name in ("temperature", "top_p", "top_k", "repeat_penalty"):
        if getattr(spec, name) is not None:
            params.append((name, _number(getattr(spec, name))))
    params.append(("num_ctx", str(spec.num_ctx or recipe.model.max_seq_length)))
    system = spec.system if spec.system is not None else trained_system_prompt(recipe) or info.default_system
    return Modelfile(from_=from_path, template=info.template, system=system or None, parameters=params), info


def run(ctx) -> dict:
    from transformers import AutoTokenizer

    from cpt_kit.run_files import gguf_path, read_quality
    from cpt_kit.export.modelfile import render
    from cpt_kit.export.ollama import SMOKE_PROMPT, ollama_name, publish
    from cpt_kit.export.quant_gate import served_quant

    recipe, run_dir = ctx.recipe, ctx.run
    chosen = chosen_quant(recipe)
    quality = read_quality(run_dir)
    quant = served_quant(chosen, quality)
    if quant != chosen:
        reasons = "; ".join(quality["formats"].get(chosen, {}).get("reasons", [])) or "not gated"
        ctx.log(f"{chosen} failed its quality limits ({reasons}): FROM uses {quant} instead (gguf/quality.json)")
    gguf = gguf_path(run_dir, recipe.name, quant)
    if not gguf.is_file():
        raise ExportError(f"{gguf} does not exist", where="export.modelfile_quant",
                          hint="run the gguf stage first, or pick a quantization the recipe produces")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(run_dir))
    from_path = Path(os.path.relpath(gguf, run_dir.ollama)).as_posix()  # ../gguf/<name>-<QUANT>.gguf
    mf, info = build_modelfile(recipe, run_dir, tokenizer, from_path)
    path = run_dir.ollama / "Modelfile"
    atomic_write_text(path, render(mf))
    for note in info.notes:
        ctx.log(f"note: {note}")
    ctx.log(f"{path}: FROM {from_path}, template {info.family}, stops {[v for k, v in mf.parameters if k == 'stop']}")
    metrics = {"modelfile": str(path.relative_to(run_dir.root)), "from": from_path, "quant": quant,
               "chosen_quant": chosen,
               "quant_fallback": f"{chosen} failed its quality limits" if quant != chosen else None,
               "template_family": info.family, "stops": mf.params("stop"),
               "system_source": "recipe" if recipe.export.modelfile.system is not None
               else "sft.system_prompt" if trained_system_prompt(recipe)
               else "chat template default" if info.default_system else None,
               "notes": info.notes, "headline": ["template_family", "quant", "ollama"]}
    if recipe.export.adapter_modelfile:
        from cpt_kit.export.adapter_modelfile import write_adapter_modelfile
        metrics["adapter_modelfile"] = write_adapter_modelfile(ctx, mf)
    if recipe.train.objective == "sft":  # a chat model goes to Ollama after its safety probe (cpt_kit.safety.stage)
        ctx.log("the chat model is handed to Ollama after the safety stage")
        return metrics
    metrics.update(publish(path, ollama_name(recipe.name), SMOKE_PROMPT, ctx.log))
    return metrics
