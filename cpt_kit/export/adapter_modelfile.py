"""`ollama/Modelfile.adapter`: the LoRA as a GGUF (llama.cpp's convert_lora_to_gguf.py) over a GGUF of
the ORIGINAL base (`FROM ./base-F16.gguf` + `ADAPTER ./adapter.gguf`).

A LoRA GGUF carries only lora_A/lora_B pairs: full `embed_tokens`/`lm_head` weights trained as
modules_to_save cannot go into it (the converter exits with "Embeddings is present in the
adapter"), so such adapters are refused up front with a pointer to the merged Modelfile.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from cpt_kit.errors import ExportError
from cpt_kit.rundir import atomic_path, atomic_write_text

FULL_MODULES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")


def trained_full_modules(adapter: Path) -> list[str]:
    """Modules the adapter stores as full weights (modules_to_save / trainable tokens), not as LoRA pairs."""
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    found = [m for m in (config.get("modules_to_save") or []) if any(f in m for f in FULL_MODULES)]
    if config.get("trainable_token_indices"):
        found.append("trainable_token_indices")
    weights = adapter / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open
        with safe_open(str(weights), framework="pt") as handle:
            found += [k for k in handle.keys() if "lora_" not in k and any(f in k for f in FULL_MODULES)]
    return sorted(set(found))


def base_dir(ctx) -> Path:
    from cpt_kit.model_source import resolve_base
    from cpt_kit.run_files import read_train_info

    base = read_train_info(ctx.run.adapter, required=False).get("base") or resolve_base(ctx.recipe.model)
    if not base or not (Path(base) / "config.json").is_file():
        raise ExportError(f"the base model {base!r} is not a local model directory", where="export.adapter_modelfile",
                          hint="the ADAPTER Modelfile needs the original base on disk to convert it to GGUF")
    return Path(base)


def convert_lora(adapter: Path, base: Path, out_file: Path) -> None:
    from cpt_kit.export.llama_cpp import LORA_CONVERTER, converter_script

    script = converter_script(LORA_CONVERTER)
    with atomic_path(out_file) as partial:
        cmd = [sys.executable, str(script), str(adapter), "--base", str(base), "--outfile", str(partial),
               "--outtype", "f16"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-12:])
            raise ExportError(f"llama.cpp's LoRA converter failed (exit {done.returncode}):\n{tail}",
                              where=str(adapter), hint=f"the error above is the converter's own ({script})")


def write_adapter_modelfile(ctx, merged_modelfile) -> dict:
    """Write base GGUF + adapter GGUF + Modelfile.adapter (same TEMPLATE/SYSTEM/parameters as the merged one)."""
    from cpt_kit.export.gguf import convert_to_gguf
    from cpt_kit.export.modelfile import render

    adapter = ctx.run.adapter
    full = trained_full_modules(adapter)
    if full:
        raise ExportError(
            f"the adapter trained full modules ({', '.join(full)}), which a LoRA GGUF cannot carry "
            "(llama.cpp's convert_lora_to_gguf.py accepts only lora_A/lora_B tensors)",
            where="export.adapter_modelfile",
            hint="use ollama/Modelfile (the merged model), or train without embeddings "
                 "(lora.train_embeddings=False) to get an ADAPTER Modelfile")
    base = base_dir(ctx)
    out = ctx.run.ollama
    base_gguf = out / f"base-{ctx.recipe.export.outtype.upper()}.gguf"
    convert_to_gguf(base, base_gguf, ctx.recipe.export.outtype, log=ctx.log)
    convert_lora(adapter, base, out / "adapter.gguf")
    mf = replace(merged_modelfile, from_=f"./{base_gguf.name}", adapter="./adapter.gguf")
    atomic_write_text(out / "Modelfile.adapter", render(mf))
    return {"modelfile": "ollama/Modelfile.adapter", "base_gguf": base_gguf.name, "adapter_gguf": "adapter.gguf"}
