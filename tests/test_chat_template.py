"""Chat-template family detection by rendering, BOS on token ids, stops, default system prompt, and
the TEMPLATE rendered by real Go text/template (the way Ollama renders it) == the model's own chat
template, byte for byte, for the REAL templates of common families (tests/real_chat_templates.py)."""

from __future__ import annotations

import shutil

import pytest

import ollama_go
import real_chat_templates as real
from cpt_kit.bos import adds_bos, runner_prompt
from cpt_kit.errors import ExportError
from cpt_kit.export.chat_families import FAMILIES, family
from cpt_kit.export.chat_template import (PROBES, detect_family, end_of_turn_tokens, expected_prompt,
                                          inspect_tokenizer)

# name: (Jinja, special tokens, bos, eos, does the real tokenizer add BOS, expected family or None = refused)
MODELS = {
    "llama-3.2-instruct": (real.LLAMA_3_2_INSTRUCT, ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                           "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"), "<|begin_of_text|>", "<|eot_id|>", True,
                           "llama31"),
    "llama-3.1-instruct": (real.LLAMA_3_1_INSTRUCT, ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                           "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"), "<|begin_of_text|>", "<|eot_id|>", True,
                           "llama31"),
    "qwen2.5-instruct": (real.QWEN_2_5_INSTRUCT, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>",
                         False, "chatml"),
    "smollm2-instruct": (real.SMOLLM2_INSTRUCT, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "<|im_start|>",
                         "<|im_end|>", False, "chatml"),
    "gemma-3-it": (real.GEMMA_3_IT, ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>", True,
                   "gemma"),
    "gemma-2-it": (real.GEMMA_2_IT, ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>", True,
                   "gemma"),
    "phi-3.5-mini-instruct": (real.PHI_3_5_MINI_INSTRUCT, ("<s>", "<|endoftext|>", "<|system|>", "<|user|>",
                              "<|assistant|>", "<|end|>"), "<s>", "<|endoftext|>", False, "phi3"),
    "phi-4": (real.PHI_4, ("<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>"), "<|endoftext|>", "<|im_end|>",
              False, "phi4"),
    "mistral-7b-instruct-v0.2": (real.MISTRAL_7B_INSTRUCT_V0_2, ("<s>", "</s>", "[INST]", "[/INST]"), "<s>", "</s>",
                                 True, "mistral"),
    "mistral-nemo-instruct-2407": (real.MISTRAL_NEMO_INSTRUCT_2407, ("<s>", "</s>", "[INST]", "[/INST]"), "<s>", "</s>",
                                   True, None),
    "llama-2-chat": (real.LLAMA_2_CHAT, ("<s>", "</s>", "[INST]", "[/INST]"), "<s>", "</s>", True, None),
}
EXPORTED = sorted(name for name, spec in MODELS.items() if spec[-1])


def load(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def model_tokenizer(bpe_dir, name):
    """The tiny byte-level BPE tokenizer dressed as model `name`: its special tokens, bos/eos, whether it adds
    BOS (a post-processor, like the real one), and its real chat template."""
    from tokenizers import processors

    jinja, specials, bos, eos, add_bos, _ = MODELS[name]
    tok = load(bpe_dir)
    tok.add_special_tokens({"additional_special_tokens": list(specials)})
    tok.bos_token, tok.eos_token = bos, eos
    if add_bos:
        bos_id = tok.convert_tokens_to_ids(bos)
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    tok.chat_template = jinja
    return tok


@pytest.mark.parametrize("name", sorted(MODELS))
def test_real_templates_detected_by_rendering(bpe_tokenizer_dir, name):
    tok = model_tokenizer(bpe_tokenizer_dir, name)
    assert adds_bos(tok) == MODELS[name][4]
    expected = MODELS[name][-1]
    if expected is None:
        with pytest.raises(ExportError, match="export.modelfile.template"):
            inspect_tokenizer(tok)
    else:
        assert detect_family(tok) == expected


@pytest.mark.parametrize("system", [None, "Sis."])
@pytest.mark.parametrize("name", EXPORTED)
def test_real_templates_render_identically_in_go(bpe_tokenizer_dir, name, system):
    """Ollama's prompt (Go text/template, Modelfile SYSTEM prepended) == the model's own chat template, on
    every probe conversation the real template accepts."""
    tok = model_tokenizer(bpe_tokenizer_dir, name)
    info = inspect_tokenizer(tok)
    system = system or info.default_system
    compared = 0
    for messages in PROBES.values():
        want = expected_prompt(tok, messages, system)
        if want is None:  # e.g. Mistral v0.2 and Gemma-2 reject a system message
            continue
        assert ollama_go.render(info.template, messages, system or "") == want
        assert not (tok.bos_token and adds_bos(tok) and want.startswith(tok.bos_token))  # BOS once, from the runner
        compared += 1
    rejects_system = expected_prompt(tok, [PROBES["system_multi_turn"][0], *PROBES["one_turn"]]) is None
    assert compared >= (0 if rejects_system and system else 2)


def test_refusals_say_what_to_do(bpe_tokenizer_dir):
    with pytest.raises(ExportError, match="no Ollama TEMPLATE") as llama2:
        inspect_tokenizer(model_tokenizer(bpe_tokenizer_dir, "llama-2-chat"))
    assert "llama2" in str(llama2.value)  # recognised as Llama-2, not passed off as Mistral
    with pytest.raises(ExportError, match="renders like none of the known families"):
        inspect_tokenizer(model_tokenizer(bpe_tokenizer_dir, "mistral-nemo-instruct-2407"))


def test_template_bos_the_tokenizer_does_not_add_is_refused(bpe_tokenizer_dir):
    """Gemma's template writes <bos>; if its tokenizer did not add BOS, Ollama's prompt would lack it."""
    tok = model_tokenizer(bpe_tokenizer_dir, "gemma-3-it")
    from tokenizers import processors
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    assert not adds_bos(tok)
    with pytest.raises(ExportError, match="does not add BOS") as info:
        inspect_tokenizer(tok)
    assert "add_bos_token" in info.value.hint


def test_role_marker_bos_is_not_a_bos(bpe_tokenizer_dir):
    """SmolLM2: bos_token is <|im_start|> and the tokenizer adds none: no BOS note, nothing stripped."""
    tok = model_tokenizer(bpe_tokenizer_dir, "smollm2-instruct")
    info = inspect_tokenizer(tok)
    assert info.notes == [] and info.family == "chatml"
    assert info.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    prompt = expected_prompt(tok, PROBES["one_turn"], info.default_system)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert runner_prompt(tok, prompt) == prompt


def test_llama31_system_header_always_written(bpe_tokenizer_dir):
    """Llama-3.1/3.2 write "Cutting Knowledge Date ... Today Date ..." even without a system message; so does
    the TEMPLATE, with the template's own fixed date (render kwarg date_string)."""
    tok = model_tokenizer(bpe_tokenizer_dir, "llama-3.2-instruct")
    info = inspect_tokenizer(tok)
    out = ollama_go.render(info.template, PROBES["one_turn"])
    assert out.startswith("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                          "Today Date: 26 Jul 2024\n\n<|eot_id|>")
    assert "<|begin_of_text|>" not in out  # the runner adds BOS
    assert "llama31" in FAMILIES and family("llama3").go_template != family("llama31").go_template


def test_stops_include_added_tokens_that_are_not_special(bpe_tokenizer_dir):
    tok = load(bpe_tokenizer_dir)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"])  # added, but not special
    tok.eos_token = "<|endoftext|>"
    assert "<|im_end|>" not in tok.all_special_tokens
    assert end_of_turn_tokens(tok, "chatml") == ["<|endoftext|>", "<|im_end|>"]


def test_family_table_is_complete():
    for name, fam in FAMILIES.items():
        assert "{%" in fam.jinja and (fam.control_tokens or name == "qa")  # qa: a plain-text prompt format
        assert fam.go_template is None or "{{" in fam.go_template, name


def test_family_from_template_text_not_from_name(tiny_chatml, tiny_llama3, tiny_base, tmp_path):
    assert inspect_tokenizer(load(tiny_chatml)).family == "chatml"
    assert inspect_tokenizer(load(tiny_llama3)).family == "llama3"
    assert inspect_tokenizer(load(tiny_base)).family == "completion"
    misleading = shutil.copytree(tiny_chatml, tmp_path / "Meta-Llama-3-8B-Instruct")  # name says llama3
    assert inspect_tokenizer(load(misleading)).family == "chatml"


def test_unknown_template_asks_for_a_family(tiny_chatml):
    tok = load(tiny_chatml)
    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ExportError, match="export.modelfile.template"):
        inspect_tokenizer(tok)
    assert inspect_tokenizer(tok, "chatml").family == "chatml"  # an explicit choice is honoured


def test_stops_found_from_tokenizer(tiny_chatml, tiny_llama3, tiny_base):
    assert "<|im_end|>" in inspect_tokenizer(load(tiny_chatml)).stops
    assert "<|eot_id|>" in inspect_tokenizer(load(tiny_llama3)).stops
    assert inspect_tokenizer(load(tiny_base)).stops == ["</s>"]
    assert inspect_tokenizer(load(tiny_base)).template == "{{ .Prompt }}"


@pytest.mark.parametrize("conversation", sorted(PROBES))
@pytest.mark.parametrize("fixture", ["tiny_chatml", "tiny_llama3"])
def test_go_template_equals_hf_chat_template(request, fixture, conversation):
    tok = load(request.getfixturevalue(fixture))
    info = inspect_tokenizer(tok)
    messages = PROBES[conversation]
    assert ollama_go.render(info.template, messages) == expected_prompt(tok, messages)
    if fixture == "tiny_llama3":  # writes BOS, the tokenizer adds it: stripped for the runner
        assert adds_bos(tok) and not expected_prompt(tok, messages).startswith(tok.bos_token)


def test_continuing_a_final_assistant_message(tiny_chatml, tiny_llama3):
    messages = PROBES["multi_turn"] + [{"role": "assistant", "content": "Zamenhof"}]
    for path in (tiny_chatml, tiny_llama3):
        tok = load(path)
        hf = runner_prompt(tok, tok.apply_chat_template(messages, tokenize=False, continue_final_message=True))
        assert ollama_go.render(inspect_tokenizer(tok).template, messages) == hf
