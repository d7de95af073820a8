"""Assistant-only labels from the rendered template: real ChatML, Llama-3, Gemma and Mistral-[INST]
templates, multi-turn with and without system; end-of-turn tokens trained; loud failures."""

from __future__ import annotations

import pytest

import real_chat_templates as real

from cpt_kit.recipe import Sft
from cpt_kit.sft.masking import IGNORE, MaskError, fit, tokenize_with_labels
from cpt_kit.sft.templates import setup_chat_template

EOT = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "llama31": "<|eot_id|>", "gemma": "<end_of_turn>",
       "mistral": "</s>", "qa": "</s>"}

SYSTEM = {"role": "system", "content": "You are a calm and kind helper."}
TURNS = [{"role": "user", "content": "Hello there, how are you today?"},
         {"role": "assistant", "content": "I am fine, thank you for asking."},
         {"role": "user", "content": "Tell me something short."},
         {"role": "assistant", "content": "The sun is a star."}]


def tokenizer_for(base, family: str, jinja: str | None = None):
    """The tiny base tokenizer with a family's control tokens and its (real) template from the family table,
    or `jinja` instead."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    setup = setup_chat_template(tok, Sft(chat_template=family))
    if jinja:
        tok.chat_template = jinja
    return tok, setup


def trained_runs(tok, example) -> list[str]:
    """The decoded text of each maximal run of trained tokens."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r, skip_special_tokens=False).strip() for r in runs]


CASES = {"chatml": ("chatml", None), "qwen2.5": ("chatml", real.QWEN_2_5_INSTRUCT), "llama3": ("llama3", None),
         "llama3.2": ("llama31", real.LLAMA_3_2_INSTRUCT), "gemma3": ("gemma", None), "mistral": ("mistral", None),
         "qa": ("qa", None)}


@pytest.mark.parametrize("with_system", [True, False], ids=["system", "no_system"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_only_assistant_turns_and_their_end_of_turn_are_trained(tiny_base, case, with_system):
    family, jinja = CASES[case]
    tok, setup = tokenizer_for(tiny_base, family, jinja)
    messages = ([SYSTEM] if with_system else []) + TURNS
    if family == "mistral" and with_system:  # Mistral v0.2's own template takes no system message
        with pytest.raises(MaskError, match="chat.jsonl:7: the chat template rejects this conversation"):
            tokenize_with_labels(tok, messages, setup.end_of_turn_ids, "chat.jsonl:7")
        return
    example = tokenize_with_labels(tok, messages, setup.end_of_turn_ids, "chat.jsonl:7")
    eot = EOT[family]
    assert trained_runs(tok, example) == [TURNS[1]["content"] + eot, TURNS[3]["content"] + eot]
    masked = tok.decode([t for t, lab in zip(example.input_ids, example.labels) if lab == IGNORE])
    for message in messages:
        if message["role"] != "assistant":
            assert message["content"].split()[-1] in masked  # user/system text is in the masked part
    # the generation prompt is masked: the token right before each trained run is not trained
    starts = [i for i, lab in enumerate(example.labels) if lab != IGNORE and (i == 0 or example.labels[i - 1] == IGNORE)]
    assert len(starts) == 2 and all(example.labels[i - 1] == IGNORE for i in starts)
    eot_id = tok.convert_tokens_to_ids(eot)
    assert sum(1 for lab in example.labels if lab == eot_id) == 2
    assert example.input_ids.count(tok.bos_token_id) == 1  # BOS once, whether the template writes it or not


def test_template_that_never_closes_the_assistant_turn_fails_naming_the_example(tiny_base):
    tok, setup = tokenizer_for(tiny_base, "chatml")
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
                         "{% if m['role'] != 'assistant' %}{{ '<|im_end|>\n' }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    with pytest.raises(MaskError, match=r"data/chat.jsonl:12: assistant turn 1 ends without a trained end-of-turn"):
        tokenize_with_labels(tok, TURNS, setup.end_of_turn_ids, "data/chat.jsonl:12")


def test_template_that_drops_assistant_text_fails_before_training(tiny_base):
    tok, setup = tokenizer_for(tiny_base, "chatml")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ '<|im_start|>' + m['role'] + "
                         "'\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}")
    with pytest.raises(MaskError, match="chat.jsonl:3"):
        tokenize_with_labels(tok, TURNS, setup.end_of_turn_ids, "chat.jsonl:3")


def test_overlong_truncated_at_a_turn_boundary_or_dropped(tiny_base):
    tok, setup = tokenizer_for(tiny_base, "chatml")
    whole = tokenize_with_labels(tok, TURNS, setup.end_of_turn_ids, "x:1")
    first = tokenize_with_labels(tok, TURNS[:2], setup.end_of_turn_ids, "x:1")
    limit = len(whole.input_ids) - 1
    cut = fit(tok, TURNS, setup.end_of_turn_ids, limit, "truncate", "x:1")
    assert cut.turns == 2 and cut.input_ids == first.input_ids and cut.labels == first.labels
    assert tok.convert_ids_to_tokens([lab for lab in cut.labels if lab != IGNORE][-1]) == "<|im_end|>"
    assert fit(tok, TURNS, setup.end_of_turn_ids, limit, "drop", "x:1") is None
    assert fit(tok, TURNS, setup.end_of_turn_ids, len(first.input_ids) - 1, "truncate", "x:1") is None
    assert fit(tok, TURNS, setup.end_of_turn_ids, len(whole.input_ids), "drop", "x:1").turns == 4


@pytest.mark.parametrize("family", ["chatml", "llama3", "gemma", "mistral", "phi3"])
def test_base_without_template_gets_single_special_control_tokens(tiny_base, family):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    size = len(tok)
    assert not tok.chat_template
    setup = setup_chat_template(tok, Sft(chat_template=family))
    controls = [a["token"] for a in setup.added if a["kind"] == "control"]
    assert controls and all(a["init"] == "mean" and a["id"] >= size for a in setup.added)
    for token in controls:
        assert token in tok.all_special_tokens
        assert tok(token, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(token)]
    assert tok.pad_token_id is not None and tok.pad_token_id not in setup.end_of_turn_ids
    assert tok.pad_token_id != tok.eos_token_id
    assert setup.family == family and setup.origin == "recipe"


def test_tokenizer_own_template_is_kept(tiny_chatml):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chatml)
    own = tok.chat_template
    setup = setup_chat_template(tok, Sft())
    assert tok.chat_template == own and setup.origin == "tokenizer" and setup.family == "chatml"
    assert not [a for a in setup.added if a["kind"] == "control"]
    assert tok.convert_tokens_to_ids("<|im_end|>") in setup.end_of_turn_ids
