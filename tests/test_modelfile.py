"""The Modelfile: values Ollama's parser reads back unchanged (checked against a copy of Ollama's own
Go parser), FROM relative to the run, stops, SYSTEM/parameters from the recipe, ollama hand-off."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

import ollama_go
from cpt_kit.errors import ExportError
from cpt_kit.export.modelfile import Modelfile, parse, parse_commands, quote, render
from stage_helpers import context, make_run, write_passing_quality

TRICKY = {
    "quotes": 'Say "hello" and \'bye\'',
    "quotes_and_newlines": 'Vi estas "Kato".\nRespondu en Esperanto.\n\n  Ne uzu "anglan".',
    "triple_quotes_inside": 'A """quoted""" word and "" pairs',
    "leading_quote": '"Quoted" at the start',
    "trailing_quote": 'ends with a quote"',
    "both_quotes": '"fully quoted"',
    "backslashes": r"C:\path\to\file \n is not a newline \\ \"",
    "spaces": "   leading and trailing   ",
    "tabs": "\tindented\twith tabs\t",
    "crlf": "windows\r\nlines\r\n",
    "hash": "# not a comment",
    "template_braces": "{{ .System }} {{ if .Prompt }}x{{ end }}",
    "unicode": "Ĉu vi ŝatas ĝin? 漢字 🙂",
    "keyword_lines": "FROM elsewhere\nPARAMETER stop x\nSYSTEM y",
}


@pytest.mark.parametrize("name", sorted(TRICKY))
def test_values_round_trip_through_python_and_go_parsers(name):
    value = TRICKY[name]
    mf = Modelfile(from_="../gguf/m-Q8_0.gguf", template=value, system=value,
                   parameters=[("stop", "<|im_end|>"), ("stop", value), ("temperature", "0.7")])
    text = render(mf)
    back = parse(text)
    assert (back.system, back.template, back.params("stop")) == (value, value, ["<|im_end|>", value])
    go = ollama_go.parse(text)  # Ollama's ParseFile, compiled from cpt_kit/export/ollama_go
    assert go == parse_commands(text)
    assert ("system", value) in go and ("template", value) in go


@pytest.mark.parametrize("value,what", [("bell\x07 inside", "U+0007"), ("nul\x00", "U+0000"),
                                        ("zero\u200bwidth", "U+200B"), ('line ends """\nnext', '"""')])
def test_unrepresentable_values_raise_naming_the_key(value, what):
    with pytest.raises(ExportError) as info:
        quote("export.modelfile.system", value)
    assert "export.modelfile.system" in str(info.value) and what in str(info.value)


def test_go_parser_agrees_that_control_characters_are_dropped():
    # The reason for refusing them: Ollama silently drops non-printable characters.
    assert ollama_go.parse('FROM x\nSYSTEM "a\x07b"\n') == [("model", "x"), ("system", "ab")]
    assert parse_commands('FROM x\nSYSTEM "a\x07b"\n') == [("model", "x"), ("system", "ab")]


def recipe_for(tiny_recipe, model_dir, **modelfile):
    from cpt_kit.recipe import Export, Model, ModelfileSpec
    return tiny_recipe(model=Model(base=str(model_dir), max_seq_length=64, load_in_4bit=False),
                       export=Export(quantizations=("Q8_0", "Q4_K_M"), modelfile=ModelfileSpec(**modelfile)))


def fake_gguf(run: Path, quant: str = "Q8_0") -> Path:
    """gguf/tiny-<quant>.gguf and a gguf/quality.json in which that quantization passed its limits."""
    path = run / "gguf" / f"tiny-{quant}.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF")
    write_passing_quality(run, {quant: 4})
    return path


@pytest.fixture()
def no_ollama(monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", f"{empty}{os.pathsep}/usr/bin{os.pathsep}/bin")
    assert shutil.which("ollama") is None


def test_stage_writes_modelfile_from_chat_tokenizer(tiny_chatml, tiny_recipe, tmp_path, no_ollama):
    from cpt_kit.export import modelfile_stage, ollama

    system = 'Vi estas "Kato", helpema asistanto.\nRespondu ĉiam en Esperanto.'
    recipe = recipe_for(tiny_recipe, tiny_chatml, system=system, temperature=0.7, top_p=0.9, top_k=40,
                        repeat_penalty=1.1, extra_stops=("\nUzanto:",))
    run = make_run(tmp_path / "run", tiny_chatml)
    gguf = fake_gguf(run)
    ctx = context(recipe, run)
    metrics = modelfile_stage.run(ctx)
    text = (run / "ollama" / "Modelfile").read_text(encoding="utf-8")
    mf = parse(text)
    assert mf.from_ == "../gguf/tiny-Q8_0.gguf"
    assert (run / "ollama" / mf.from_).resolve() == gguf.resolve()
    assert mf.system == system
    assert mf.params("stop") == ["<|im_end|>", "\nUzanto:"]
    assert mf.params("temperature") == ["0.7"] and mf.params("top_p") == ["0.9"] and mf.params("top_k") == ["40"]
    assert mf.params("repeat_penalty") == ["1.1"] and mf.params("num_ctx") == ["64"]
    assert "<|im_start|>" in mf.template and metrics["template_family"] == "chatml"
    assert ollama_go.parse(text)[:1] == [("model", "../gguf/tiny-Q8_0.gguf")]
    # the run folder can move: FROM still resolves from the Modelfile's own folder
    moved = shutil.move(str(run), str(tmp_path / "elsewhere"))
    assert (Path(moved) / "ollama" / mf.from_).is_file()
    # no ollama: the exact commands are printed and recorded
    modelfile = (run / "ollama" / "Modelfile").resolve()
    assert metrics["ollama"] == "not_found"
    assert metrics["commands"][0] == f"ollama create tiny -f {modelfile}"
    assert metrics["commands"][1] == f"ollama run tiny {ollama.SMOKE_PROMPT}"
    assert metrics["commands"][0] in ctx.console.text and metrics["commands"][1] in ctx.console.text


def test_system_for_a_template_that_rejects_system_is_refused(tiny_chatml, tiny_recipe, tmp_path, no_ollama):
    """Gemma-2-it's real template raises on a system message: a recipe SYSTEM is refused up front."""
    import real_chat_templates
    from transformers import AutoTokenizer

    from cpt_kit.export import modelfile_stage
    from cpt_kit.rundir import RunDir

    run = make_run(tmp_path / "run", tiny_chatml)
    tok = AutoTokenizer.from_pretrained(run / "merged")
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = real_chat_templates.GEMMA_2_IT
    mf, info = modelfile_stage.build_modelfile(recipe_for(tiny_recipe, tiny_chatml), RunDir(run), tok, "x.gguf")
    assert info.family == "gemma" and mf.system is None
    with pytest.raises(ExportError, match="rejects a system message") as error:
        modelfile_stage.build_modelfile(recipe_for(tiny_recipe, tiny_chatml, system="Sis."), RunDir(run), tok, "x.gguf")
    assert error.value.where == "export.modelfile.system"


def test_base_model_gets_completion_template_and_chosen_quant(tiny_base, tiny_recipe, tmp_path, no_ollama):
    from cpt_kit.export import modelfile_stage

    recipe = recipe_for(tiny_recipe, tiny_base, num_ctx=128)
    recipe = dataclasses.replace(recipe, export=dataclasses.replace(recipe.export, modelfile_quant="Q4_K_M"))
    run = make_run(tmp_path / "run", tiny_base)
    fake_gguf(run, "Q4_K_M")
    modelfile_stage.run(context(recipe, run))
    mf = parse((run / "ollama" / "Modelfile").read_text(encoding="utf-8"))
    assert mf.from_ == "../gguf/tiny-Q4_K_M.gguf"
    assert mf.template == "{{ .Prompt }}" and mf.system is None
    assert mf.params("stop") == ["</s>"] and mf.params("num_ctx") == ["128"]


def test_missing_gguf_is_a_clear_error(tiny_base, tiny_recipe, tmp_path):
    from cpt_kit.export import modelfile_stage

    run = make_run(tmp_path / "run", tiny_base)
    with pytest.raises(ExportError, match="gguf stage"):
        modelfile_stage.run(context(recipe_for(tiny_recipe, tiny_base), run))


def test_fake_ollama_on_path_is_called_with_the_right_args(tiny_llama3, tiny_recipe, tmp_path, monkeypatch):
    from cpt_kit.export import modelfile_stage, ollama

    bin_dir, log = tmp_path / "bin", tmp_path / "ollama-calls.txt"
    bin_dir.mkdir()
    script = bin_dir / "ollama"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{log}"\n'
                      f'[ "$1" = run ] && echo "Saluton, mi estas Kato."\nexit 0\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run = make_run(tmp_path / "run", tiny_llama3)
    fake_gguf(run)
    metrics = modelfile_stage.run(context(recipe_for(tiny_recipe, tiny_llama3), run))
    modelfile = (run / "ollama" / "Modelfile").resolve()
    assert log.read_text().splitlines() == [f"create tiny -f {modelfile}", f"run tiny {ollama.SMOKE_PROMPT}"]
    assert metrics["ollama"] == "created" and metrics["sample"] == "Saluton, mi estas Kato."
    mf = parse(modelfile.read_text(encoding="utf-8"))
    assert mf.params("stop") == ["<|eot_id|>"] and "<|start_header_id|>" in mf.template


def test_failing_ollama_raises(tiny_base, tiny_recipe, tmp_path, monkeypatch):
    from cpt_kit.export import modelfile_stage

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ollama").write_text("#!/bin/sh\necho 'could not connect to ollama app' >&2\nexit 1\n")
    (bin_dir / "ollama").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run = make_run(tmp_path / "run", tiny_base)
    fake_gguf(run)
    with pytest.raises(ExportError, match="could not connect"):
        modelfile_stage.run(context(recipe_for(tiny_recipe, tiny_base), run))


def test_adapter_modelfile_refuses_trained_embeddings(tmp_path):
    import json

    from cpt_kit.export.adapter_modelfile import trained_full_modules
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"modules_to_save": ["embed_tokens", "lm_head"]}))
    assert trained_full_modules(adapter) == ["embed_tokens", "lm_head"]


def save_lora(base_dir, out_dir, modules_to_save=None):
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        modules_to_save=modules_to_save, task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(out_dir)
    (out_dir / "cpt_kit_train.json").write_text(json.dumps({"base": str(base_dir)}))


def test_adapter_modelfile_refused_for_trained_embeddings(tiny_base, tiny_recipe, tmp_path, no_ollama):
    from cpt_kit.export import modelfile_stage

    recipe = recipe_for(tiny_recipe, tiny_base)
    recipe = dataclasses.replace(recipe, export=dataclasses.replace(recipe.export, adapter_modelfile=True))
    run = make_run(tmp_path / "run", tiny_base)
    fake_gguf(run)
    save_lora(tiny_base, run / "adapter", modules_to_save=["embed_tokens", "lm_head"])
    with pytest.raises(ExportError, match="embed_tokens.*LoRA GGUF cannot carry") as info:
        modelfile_stage.run(context(recipe, run))
    assert "ollama/Modelfile (the merged model)" in str(info.value)


@pytest.mark.slow
def test_adapter_modelfile_over_base_gguf(tiny_base, tiny_recipe, tmp_path, no_ollama):
    from llama_cpp import Llama

    from cpt_kit.export import modelfile_stage

    recipe = recipe_for(tiny_recipe, tiny_base, system="Sis.")
    recipe = dataclasses.replace(recipe, export=dataclasses.replace(recipe.export, adapter_modelfile=True))
    run = make_run(tmp_path / "run", tiny_base)
    fake_gguf(run)
    save_lora(tiny_base, run / "adapter")
    metrics = modelfile_stage.run(context(recipe, run))
    text = (run / "ollama" / "Modelfile.adapter").read_text(encoding="utf-8")
    mf = parse(text)
    assert (mf.from_, mf.adapter, mf.system) == ("./base-F16.gguf", "./adapter.gguf", "Sis.")
    assert ollama_go.parse(text)[:2] == [("model", "./base-F16.gguf"), ("adapter", "./adapter.gguf")]
    assert metrics["adapter_modelfile"]["modelfile"] == "ollama/Modelfile.adapter"
    base, lora = run / "ollama" / "base-F16.gguf", run / "ollama" / "adapter.gguf"
    plain = Llama(model_path=str(base), n_ctx=64, logits_all=True, verbose=False)
    adapted = Llama(model_path=str(base), lora_path=str(lora), n_ctx=64, logits_all=True, verbose=False)
    ids = plain.tokenize(b"La kato", add_bos=True)
    plain.eval(ids)
    adapted.eval(ids)
    last = len(ids) - 1
    assert plain.scores[last].any() and (plain.scores[last] != adapted.scores[last]).any()  # the adapter is applied
