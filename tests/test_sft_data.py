"""Chat data: the three row layouts, each bad-data case with its file:line, and the sft prepare stage
(stats by reason, duplicates, split by conversation, over-length policy, template files)."""

from __future__ import annotations

import json

import pytest

from stage_helpers import context

from cpt_kit.errors import DataError
from cpt_kit.recipe import Data, Eval, Lora, Model, Recipe, Sft, Train
from cpt_kit.sft.conversations import ChatDataError, conversation


def chat_rows(n: int = 24) -> list[dict]:
    """n distinct two-turn conversations (messages layout)."""
    return [{"messages": [{"role": "user", "content": f"Question number {i}: how are you {i % 5} today?"},
                          {"role": "assistant", "content": f"I am well, answer {i}. Thank you."}]} for i in range(n)]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_three_layouts_give_the_same_conversation():
    spec = Sft(question_field="q", answer_field="a")
    expected = conversation({"messages": [{"role": "user", "content": "Hi?"},
                                          {"role": "assistant", "content": "Hello."}]}, spec, "f:1").messages
    sharegpt = {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}
    assert conversation(sharegpt, spec, "f:2").messages == expected
    assert conversation({"q": "Hi?", "a": "Hello."}, spec, "f:3").messages == expected
    with_system = conversation({"q": "Hi?", "a": "Hello."}, Sft(question_field="q", answer_field="a",
                                                                   system_prompt="Be kind."), "f:4")
    assert with_system.messages[0] == {"role": "system", "content": "Be kind."} and with_system.messages[1:] == expected


BAD = {
    "unknown_role": ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
                     "turn 1 has unknown role 'bot'"),
    "empty_content": ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]},
                      "turn 1 \\(assistant\\) has empty content"),
    "no_assistant_turn": ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]},
                          "no assistant turn"),
    "same_role_twice": ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                      {"role": "assistant", "content": "c"}]}, "turns 0 and 1 are both user"),
    "system_not_first": ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                                       {"role": "assistant", "content": "c"}]}, "system message may only come first"),
    "no_chat_fields": ({"text": "plain"}, "no chat fields"),
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_row_names_file_and_line(tmp_path, tiny_base, reason):
    row, message = BAD[reason]
    rows = chat_rows(4)
    rows.insert(2, row)
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    recipe = sft_recipe(tiny_base, path)
    with pytest.raises(ChatDataError, match=rf"chat.jsonl:3: .*{message}") as info:
        run_prepare(recipe, tmp_path / "run")
    assert info.value.reason == reason
    assert not (tmp_path / "run" / "data").exists()  # nothing half-written


def test_invalid_json_line_named(tmp_path, tiny_base):
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, chat_rows(3))
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(DataError, match=r"chat.jsonl:4: invalid JSON"):
        run_prepare(sft_recipe(tiny_base, str(path)), tmp_path / "run")


def sft_recipe(base, *sources, **sft) -> Recipe:
    return Recipe(name="chat", model=Model(base=str(base), max_seq_length=96, load_in_4bit=False),
                  lora=Lora(r=4, lora_alpha=8, train_embeddings=False),
                  data=Data(sources=tuple(sources), heldout_fraction=0.2),
                  train=Train(objective="sft", backend="hf", embedding_learning_rate=None),
                  eval=Eval(max_new_tokens=0), sft=Sft(**sft))


def run_prepare(recipe, root):
    from cpt_kit.data import prepare
    return prepare.run(context(recipe, root))


def test_prepare_counts_every_drop_and_splits_by_conversation(tmp_path, tiny_base):
    from datasets import load_from_disk

    rows = chat_rows(30)
    rows += [rows[0], rows[5], rows[5]]                                     # 3 exact duplicates
    rows.append({"messages": [{"role": "user", "content": "long " * 200},  # cannot fit: dropped
                              {"role": "assistant", "content": "ok"}]})
    rows.append({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"},
                              {"role": "assistant", "content": "z"}]})       # invalid: dropped (policy)
    multi = {"messages": [{"role": "user", "content": "Short question?"}, {"role": "assistant", "content": "Yes."},
                          {"role": "user", "content": "more " * 80}, {"role": "assistant", "content": "No."}]}
    rows.append(multi)                                                      # truncated after turn 2
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows[:20])
    parquet = tmp_path / "b.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{"conversations": [{"from": "human" if m["role"] == "user" else "gpt",
                                                             "value": m["content"]} for m in r["messages"]]}
                                         for r in rows[20:]]), parquet)
    recipe = sft_recipe(tiny_base, jsonl, str(parquet), invalid="drop")
    metrics = run_prepare(recipe, tmp_path / "run")
    data = tmp_path / "run" / "data"
    stats = json.loads((data / "stats.json").read_text())
    conv = stats["conversations"]
    assert conv["read"] == 36 and conv["dropped"] == {"duplicate": 3, "too_long": 1, "same_role_twice": 1}
    assert conv["truncated"] == 1 and conv["kept"] == 31
    train = list(load_from_disk(str(data / "train"))["input_ids"])
    held = list(load_from_disk(str(data / "heldout"))["input_ids"])
    assert len(train) + len(held) == 31 and len(held) >= 1
    assert not {tuple(r) for r in train} & {tuple(r) for r in held}
    assert max(len(r) for r in train + held) <= 96
    share = stats["train"]["trained_share"]
    assert 0 < share < 1 and metrics["trained_token_share"] == share
    assert json.loads((data / "chat_template.json").read_text())["family"] == "chatml"
    ext = json.loads((data / "tokenizer_extension.json").read_text())
    assert [a["token"] for a in ext["added"]] == ["<|im_start|>", "<|im_end|>"]
    texts = [json.loads(line)["text"] for line in (data / "heldout_texts.jsonl").read_text().splitlines()]
    assert len(texts) == len(held) and all(t.startswith("<|im_start|>user\n") for t in texts)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id and "im_start" in tok.chat_template


def test_split_is_stable_when_conversations_are_added(tmp_path, tiny_base):
    from datasets import load_from_disk

    def held(n, root):
        run_prepare(sft_recipe(tiny_base, write_jsonl(tmp_path / f"c{n}.jsonl", chat_rows(n))), root)
        return {tuple(r) for r in load_from_disk(str(root / "data" / "heldout"))["input_ids"]}

    small, large = held(20, tmp_path / "r1"), held(40, tmp_path / "r2")
    assert small <= large


def test_recipe_rules_for_sft():
    from cpt_kit.errors import RecipeError
    from cpt_kit.recipe import Export, ModelfileSpec, Replay

    base = Model(base="x", load_in_4bit=False)
    with pytest.raises(RecipeError, match="(?s)sft.chat_template.*did you mean 'chatml'"):
        Recipe(name="a", model=base, train=Train(objective="sft"), sft=Sft(chat_template="chatm"))
    with pytest.raises(RecipeError, match="export.modelfile.template"):
        Recipe(name="a", model=base, train=Train(objective="sft"), sft=Sft(chat_template="gemma"),
               export=Export(modelfile=ModelfileSpec(template="chatml")))
    with pytest.raises(RecipeError, match="data.replay"):
        Recipe(name="a", model=base, train=Train(objective="sft"), data=Data(replay=Replay(sources=("g",))))
    with pytest.raises(RecipeError, match="train.packing"):
        Recipe(name="a", model=base, train=Train(packing=True))


def test_saved_dataset_source_and_row_named_in_errors(tmp_path, tiny_base):
    from datasets import Dataset

    rows = [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}."} for i in range(12)]
    rows[4]["answer"] = ""
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "qa_set"))
    recipe = sft_recipe(tiny_base, str(tmp_path / "qa_set"), chat_template="qa")
    with pytest.raises(ChatDataError, match=r"qa_set:row 5: turn 1 \(assistant\) has empty content"):
        run_prepare(recipe, tmp_path / "run")
    metrics = run_prepare(sft_recipe(tiny_base, str(tmp_path / "qa_set"), chat_template="qa", invalid="drop"),
                          tmp_path / "run2")
    assert metrics["conversations_kept"] == 11 and metrics["dropped"] == {"empty_content": 1}
    assert metrics["chat_template"] == "qa" and metrics["added_tokens"] == []


def test_prepare_replaces_only_its_own_entries_of_data(tmp_path, tiny_base):
    """The chat prepare writes its entries of data/, as the CPT prepare does: a user's file there survives
    a rerun after a deleted output and a --stage prepare --force."""
    from stage_helpers import quiet_console

    from cpt_kit.pipeline import run_pipeline
    from cpt_kit.rundir import RunDir

    recipe = sft_recipe(tiny_base, write_jsonl(tmp_path / "chat.jsonl", chat_rows(20)))
    run = RunDir(tmp_path / "run")
    run_pipeline(recipe, run, quiet_console(), until="prepare")
    (run.data / "mine.txt").write_text("mine")
    (run.data / "stats.json").unlink()
    run_pipeline(recipe, run, quiet_console(), until="prepare")  # redoes prepare: an output is missing
    assert (run.data / "stats.json").is_file() and (run.data / "mine.txt").read_text() == "mine"
    run_pipeline(recipe, run, quiet_console(), only="prepare", force=True)
    assert (run.data / "mine.txt").read_text() == "mine"
    assert sorted(p.name for p in run.data.iterdir()) == ["chat_template.json", "heldout", "heldout_texts.jsonl",
                                                          "mine.txt", "stats.json", "tokenizer",
                                                          "tokenizer_extension.json", "train"]
