"""Chat export: each training family's Jinja renders like its Ollama TEMPLATE (real Go), and the
end-to-end chain tiny CPT run -> SFT from that run directory -> export -> verify (control tokens
one GGUF control token each, greedy generation ends on the end-of-turn token), with lineage."""

from __future__ import annotations

import json

import pytest

import ollama_go
from stage_helpers import run_until
from test_sft_data import chat_rows, write_jsonl

from cpt_kit.recipe import Sft


@pytest.mark.parametrize("conversation", ["one_turn", "multi_turn", "system_multi_turn"])
@pytest.mark.parametrize("family", ["chatml", "llama3", "gemma", "mistral", "qa"])
def test_training_template_renders_like_the_modelfile_template(tiny_base, family, conversation):
    from transformers import AutoTokenizer

    from cpt_kit.export.chat_template import PROBES, expected_prompt, inspect_tokenizer
    from cpt_kit.sft.templates import setup_chat_template

    tok = AutoTokenizer.from_pretrained(tiny_base)
    setup_chat_template(tok, Sft(chat_template=family))
    info = inspect_tokenizer(tok)
    assert info.family == family
    messages = PROBES[conversation]
    expected = expected_prompt(tok, messages)
    if expected is None:  # the family's own template rejects it (Mistral v0.2 takes no system message)
        assert family == "mistral" and messages[0]["role"] == "system"
        return
    assert ollama_go.render(info.template, messages) == expected
    if family != "qa":
        assert tok.eos_token in info.stops


@pytest.mark.slow
def test_cpt_run_then_sft_from_it_then_export_and_verify(tmp_path, tiny_recipe, tiny_base):
    from cpt_kit.lineage import weights_sha256
    from cpt_kit.recipe import Data, Eval, Export, Lora, Model, Recipe, Train

    cpt_root = tmp_path / "language"
    run_until(tiny_recipe(), cpt_root, "merge")
    source = write_jsonl(tmp_path / "chat.jsonl", chat_rows(40))
    recipe = Recipe(
        name="chat", model=Model(base=str(cpt_root), max_seq_length=96, load_in_4bit=False),
        lora=Lora(r=8, lora_alpha=16, train_embeddings=False),
        data=Data(sources=(source,), heldout_fraction=0.1),
        train=Train(objective="sft", backend="hf", learning_rate=3e-3, embedding_learning_rate=None, max_steps=150,
                    per_device_train_batch_size=8, gradient_accumulation_steps=1, eval_steps=50, save_steps=150,
                    warmup_ratio=0.0, gradient_checkpointing=False, packing=True),
        eval=Eval(max_new_tokens=0, max_blocks=4), export=Export(quantizations=("Q8_0",)),
        sft=Sft(system_prompt="You answer kindly."))
    root = tmp_path / "chat"
    manifest = run_until(recipe, root, "verify")

    lineage = manifest.data["lineage"]
    assert [item["kind"] for item in lineage] == ["run"] and lineage[0]["base"] == str(tiny_base)
    assert lineage[0]["recipe"] == "tiny" and lineage[0]["objective"] == "cpt"
    assert lineage[0]["merged_sha256"] == weights_sha256(cpt_root / "merged")

    verify = json.loads((root / "verify.json").read_text())
    assert verify["passed"], verify
    controls = verify["checks"]["control_tokens"]["tokens"]
    assert set(controls) >= {"<|im_start|>", "<|im_end|>"}
    assert all(t["single_token"] and t["control"] for t in controls.values())
    stop = verify["checks"]["stop"]
    assert stop["natural"]["required"] and stop["natural"]["finish_reason"] == "stop"
    assert stop["eot_tokens"]["<|im_end|>"]["is_eog"]

    modelfile = (root / "ollama" / "Modelfile").read_text()
    assert "PARAMETER stop <|im_end|>" in modelfile and 'SYSTEM """You answer kindly."""' in modelfile or \
        "SYSTEM You answer kindly." in modelfile
    prepare = manifest.data["stages"]["prepare"]["metrics"]
    assert 0 < prepare["trained_token_share"] < 1 and prepare["chat_template"] == "chatml"


def test_the_natural_stop_bound_follows_the_held_out_answer_length(tiny_chatml, tmp_path):
    """A model trained on long answers gets twice its held-out reference answer to end its turn (at least 64
    tokens), prompted with that conversation up to the answer; a model that is not fine-tuned gets a greeting."""
    from transformers import AutoTokenizer

    from cpt_kit.export.verify_stage import STOP_BOUND_MIN, stop_check_prompt
    from cpt_kit.rundir import RunDir

    tokenizer = AutoTokenizer.from_pretrained(tiny_chatml)
    long_answer = " ".join(["I hear how heavy this week has been for you, and it makes sense to feel tired."] * 8)
    conversation = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "I feel low."},
                    {"role": "assistant", "content": long_answer}, {"role": "user", "content": "Thanks."},
                    {"role": "assistant", "content": "Any time."}]
    run = RunDir(tmp_path)
    run.data.mkdir(parents=True)
    write_jsonl(run.data / "heldout_texts.jsonl", [{"messages": conversation}])
    answer_tokens = len(tokenizer(long_answer, add_special_tokens=False)["input_ids"])
    assert 2 * answer_tokens > STOP_BOUND_MIN
    assert stop_check_prompt(run, True, tokenizer) == (conversation[:2], 2 * answer_tokens)
    messages, bound = stop_check_prompt(run, False, tokenizer)
    assert messages[0]["role"] == "user" and bound == 32
