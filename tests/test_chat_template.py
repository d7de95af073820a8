"""Chat-template family detection, stops, default system prompt, and the TEMPLATE rendered by real
Go text/template (the way Ollama renders it) == tokenizer.apply_chat_template, byte for byte."""

from __future__ import annotations

import shutil

import pytest

import ollama_go
from cpt_kit.export.chat_template import adds_bos, detect_family, inspect_tokenizer

CONVERSATIONS = {
    "one_turn": [{"role": "user", "content": "Saluton! Kiel vi fartas?"}],
    "multi_turn": [{"role": "user", "content": "Kio estas Esperanto?"},
                   {"role": "assistant", "content": "Planlingvo de 1887."},
                   {"role": "user", "content": "Kiu kreis ĝin?\nDiru mallonge."}],
    "system_multi_turn": [{"role": "system", "content": "Vi respondas \"mallonge\" kaj ĝentile."},
                          {"role": "user", "content": "Saluton"},
                          {"role": "assistant", "content": "Saluton! Kiel mi helpu?"},
                          {"role": "user", "content": "Rakontu {{ .Prompt }} ŝercon."}],
}

GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
         "{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
         "{% for message in loop_messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}"
         "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') "
         "+ message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
PHI3 = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\n\n' %}"
           "{% set loop_messages = messages[1:] %}{% else %}{% set sys = '' %}{% set loop_messages = messages %}{% endif %}"
           "{% for message in loop_messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + (sys if loop.first else '') "
           "+ message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
QWEN_LIKE = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are Kato, a helpful \"assistant\".<|im_end|>\n' }}"
             "{% endif %}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def load(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def hf_render(tokenizer, messages) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        assert adds_bos(tokenizer), "the template writes BOS but the tokenizer would not add it"
        text = text[len(tokenizer.bos_token):]  # Ollama's runner adds BOS from the GGUF instead
    return text


def test_family_from_template_text_not_from_name(tiny_chatml, tiny_llama3, tiny_base, tmp_path):
    assert inspect_tokenizer(load(tiny_chatml)).family == "chatml"
    assert inspect_tokenizer(load(tiny_llama3)).family == "llama3"
    assert inspect_tokenizer(load(tiny_base)).family == "completion"
    misleading = shutil.copytree(tiny_chatml, tmp_path / "Meta-Llama-3-8B-Instruct")  # name says llama3
    assert inspect_tokenizer(load(misleading)).family == "chatml"
    assert detect_family(GEMMA) == "gemma" and detect_family(PHI3) == "phi3" and detect_family(MISTRAL) == "mistral"


def test_unknown_template_asks_for_a_family(tiny_chatml):
    from cpt_kit.errors import ExportError
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


def test_default_system_prompt_detected(tiny_chatml):
    tok = load(tiny_chatml)
    assert inspect_tokenizer(tok).default_system is None
    tok.chat_template = QWEN_LIKE
    info = inspect_tokenizer(tok)
    assert info.family == "chatml" and info.default_system == 'You are Kato, a helpful "assistant".'
    # Ollama: SYSTEM is prepended as a system message when the conversation has none.
    messages = CONVERSATIONS["multi_turn"]
    assert ollama_go.render(info.template, messages, system=info.default_system) == hf_render(tok, messages)


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("fixture", ["tiny_chatml", "tiny_llama3"])
def test_go_template_equals_hf_chat_template(request, fixture, conversation):
    tok = load(request.getfixturevalue(fixture))
    info = inspect_tokenizer(tok)
    messages = CONVERSATIONS[conversation]
    ollama = ollama_go.render(info.template, messages)
    assert ollama == hf_render(tok, messages)
    assert not (tok.bos_token and ollama.startswith(tok.bos_token))  # BOS comes once, from the runner
    if fixture == "tiny_llama3":
        assert info.bos_in_template and adds_bos(tok)


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_go_template_with_modelfile_system(tiny_chatml, conversation):
    tok = load(tiny_chatml)
    info = inspect_tokenizer(tok)
    messages = CONVERSATIONS[conversation]
    expected = messages if messages[0]["role"] == "system" else [{"role": "system", "content": "Sis."}] + messages
    assert ollama_go.render(info.template, messages, system="Sis.") == hf_render(tok, expected)


@pytest.mark.parametrize("family,jinja", [("gemma", GEMMA), ("phi3", PHI3), ("mistral", MISTRAL)])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_other_families_render_like_their_jinja(tiny_chatml, family, jinja, conversation):
    tok = load(tiny_chatml)
    tok.chat_template = jinja
    info = inspect_tokenizer(tok)
    assert info.family == family
    messages = CONVERSATIONS[conversation]
    assert ollama_go.render(info.template, messages) == hf_render(tok, messages)


def test_continuing_a_final_assistant_message(tiny_chatml, tiny_llama3):
    messages = CONVERSATIONS["multi_turn"] + [{"role": "assistant", "content": "Zamenhof"}]
    for path in (tiny_chatml, tiny_llama3):
        tok = load(path)
        hf = tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        hf = hf[len(tok.bos_token):] if hf.startswith(tok.bos_token) else hf
        assert ollama_go.render(inspect_tokenizer(tok).template, messages) == hf
