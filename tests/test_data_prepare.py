"""The prepare stage end to end on the tiny SentencePiece tokenizer: outputs, packing, split, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cpt_kit.data import prepare
from cpt_kit.data.clean import clean_text
from cpt_kit.errors import DataError
from cpt_kit.manifest import Manifest
from cpt_kit.pipeline import StageContext
from cpt_kit.rundir import RunDir


def run_prepare(recipe, root):
    from rich.console import Console

    run = RunDir(root)
    ctx = StageContext(recipe, run, Manifest.load(run.manifest), Console(quiet=True))
    return prepare.run(ctx), run


def load_blocks(path):
    import datasets

    ds = datasets.load_from_disk(str(path))
    assert ds.column_names == ["input_ids"]
    return np.array(ds["input_ids"], dtype=np.int64)


def heldout_texts(run):
    return [json.loads(line)["text"] for line in (run.data / "heldout_texts.jsonl").read_text().splitlines()]


def test_outputs_and_eos_only_at_document_ends(tiny_recipe, target_texts, tmp_path):
    from transformers import AutoTokenizer

    recipe = tiny_recipe()
    metrics, run = run_prepare(recipe, tmp_path / "run")
    for name in ("train", "heldout", "heldout_texts.jsonl", "tokenizer", "stats.json"):
        assert (run.data / name).exists(), name
    assert (run.tokenizer / "tokenizer.model").is_file()
    assert not (run.data / "replay_heldout").exists()
    train = load_blocks(run.data / "train")
    assert train.shape == (metrics["train_blocks"], 64) and metrics["train_blocks"] >= 4
    assert metrics["train_tokens"] == train.size
    assert 0 < metrics["fertility"] and "train_tokens" in metrics["headline"]

    tok = AutoTokenizer.from_pretrained(str(run.tokenizer))
    held = set(heldout_texts(run))
    docs = [clean_text(t) for t in target_texts]
    train_docs = [d for d in docs if d not in held]
    assert held and len(train_docs) + len(held) == len(docs)  # every document on exactly one side
    expected, ends = [], []
    for doc in train_docs:
        expected += [tok.bos_token_id] + tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ends.append(len(expected) - 1)
    flat = train.reshape(-1).tolist()
    assert flat == expected[: len(flat)] and len(expected) - len(flat) < 64
    assert [i for i, t in enumerate(flat) if t == tok.eos_token_id] == [e for e in ends if e < len(flat)]

    stats = json.loads((run.data / "stats.json").read_text())
    assert stats["corpus"]["split"]["heldout_documents"] == len(held)
    assert stats["corpus"]["tokens"]["dropped_train_tail"] == len(expected) - len(flat)


def test_heldout_shares_no_document_with_train(tiny_recipe, target_texts, tmp_path):
    from transformers import AutoTokenizer

    metrics, run = run_prepare(tiny_recipe(), tmp_path / "run")
    tok = AutoTokenizer.from_pretrained(str(run.tokenizer))
    held = heldout_texts(run)
    train_text = tok.decode(load_blocks(run.data / "train").reshape(-1).tolist(), skip_special_tokens=True)
    heldout_text = tok.decode(load_blocks(run.data / "heldout").reshape(-1).tolist(), skip_special_tokens=True)
    for doc in held:
        first_line = doc.splitlines()[0]
        assert first_line not in train_text
    assert held[0].splitlines()[0] in heldout_text
    assert metrics["heldout_blocks"] >= 1


def test_two_runs_give_identical_blocks(tiny_recipe, tmp_path):
    recipe = tiny_recipe(data={"num_proc": 2})
    _, first = run_prepare(recipe, tmp_path / "a")
    _, second = run_prepare(recipe, tmp_path / "b")
    for part in ("train", "heldout"):
        assert np.array_equal(load_blocks(first.data / part), load_blocks(second.data / part))
    assert heldout_texts(first) == heldout_texts(second)


def test_every_drop_reason_counted(tiny_recipe, target_texts, write_corpus, tmp_path):
    near = target_texts[1].replace(" la ", " la granda ", 1)
    docs = list(target_texts) + ["\x00\x01 \n\n  ", "Mallonga.", "x " * 3000, target_texts[0], near]
    corpus = write_corpus(docs, "dirty")
    metrics, run = run_prepare(tiny_recipe(data={"sources": (str(corpus),), "max_chars": 5000}), tmp_path / "run")
    assert metrics["dropped"] == {"empty": 1, "too_short": 1, "too_long": 1, "exact_duplicate": 1,
                                  "near_duplicate": 1}
    stats = json.loads((run.data / "stats.json").read_text())
    assert stats["corpus"]["documents"]["kept"] == len(target_texts)
    assert stats["corpus"]["documents"]["read"] == len(docs)


def test_too_small_corpus_says_how_much_is_there_and_needed(tiny_recipe, target_texts, write_corpus, tmp_path):
    corpus = write_corpus(target_texts[:4], "small")
    recipe = tiny_recipe(data={"sources": (str(corpus),), "min_train_blocks": 400})
    with pytest.raises(DataError) as info:
        run_prepare(recipe, tmp_path / "run")
    message = info.value.render()
    assert "need at least 400 blocks (25,600 tokens)" in message and "blocks of 64" in message
    assert "data.min_train_blocks" in message
    assert not (tmp_path / "run" / "data").exists()


def test_empty_corpus_is_an_error(tiny_recipe, write_corpus, tmp_path):
    corpus = write_corpus(["", "  \n ", "abc"], "empty")
    with pytest.raises(DataError, match=r"0 usable document\(s\) after cleaning \(read 3, dropped: .*2 empty"):
        run_prepare(tiny_recipe(data={"sources": (str(corpus),)}), tmp_path / "run")


def test_crash_leaves_no_half_written_data(tiny_recipe, tmp_path, monkeypatch):
    from cpt_kit.data import tokenizer_files

    recipe = tiny_recipe()
    _, run = run_prepare(recipe, tmp_path / "run")
    before = load_blocks(run.data / "train")

    def boom(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(tokenizer_files, "save_tokenizer", boom)
    with pytest.raises(RuntimeError):
        run_prepare(recipe, tmp_path / "run")
    assert np.array_equal(load_blocks(run.data / "train"), before)
    assert sorted(p.name for p in run.root.iterdir()) == ["data"]


def test_replay_share_and_replay_heldout(tiny_recipe, general_texts, write_corpus, tmp_path):
    from cpt_kit.recipe import Replay

    general = write_corpus(general_texts, "general")
    recipe = tiny_recipe(data={"replay": Replay(sources=(str(general),), fraction=0.25, heldout_fraction=0.1)})
    metrics, run = run_prepare(recipe, tmp_path / "run")
    stats = json.loads((run.data / "stats.json").read_text())
    replay_blocks = stats["train"]["replay_blocks"]
    assert replay_blocks == round(0.25 / 0.75 * stats["train"]["corpus_blocks"])
    assert abs(metrics["replay_share"] - 0.25) < 0.03
    train = load_blocks(run.data / "train")
    assert len(train) == stats["train"]["corpus_blocks"] + replay_blocks
    replay_heldout = load_blocks(run.data / "replay_heldout")
    assert replay_heldout.shape[1] == 64 and len(replay_heldout) == metrics["replay_heldout_blocks"] >= 1
    # replay held-out blocks never appear among the training blocks
    train_rows = {row.tobytes() for row in train}
    assert not any(row.tobytes() in train_rows for row in replay_heldout)
    _, again = run_prepare(recipe, tmp_path / "again")
    assert np.array_equal(load_blocks(again.data / "train"), train)


def test_input_fingerprint_hashes_content(tiny_recipe, tmp_path):
    from rich.console import Console

    recipe = tiny_recipe()
    run = RunDir(tmp_path / "run")
    ctx = StageContext(recipe, run, Manifest.load(run.manifest), Console(quiet=True))
    first = prepare.input_fingerprint(ctx)
    assert len(first["sources"]) >= 10 and all(len(s["sha256"]) == 64 for s in first["sources"])
    assert "tokenizer.model" in first["tokenizer"]
    path = recipe.data.sources[0]
    target = sorted(p for p in __import__("pathlib").Path(path).iterdir())[0]
    target.write_text(target.read_text(encoding="utf-8") + " Plia.", encoding="utf-8")
    assert prepare.input_fingerprint(ctx) != first


def test_threaded_tokenization_matches_single_thread_in_order(tiny_base, target_texts):
    from transformers import AutoTokenizer

    from cpt_kit.data.tokenize import encode_batches, text_batches

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    texts = [f"{i} " + target_texts[i % len(target_texts)][: 40 + i % 50] for i in range(2500)]
    batches = list(text_batches(texts, max_chars=5000))
    assert len(batches) > 10 and sum(map(len, batches)) == 2500
    single = [ids for _, array in encode_batches(tok, batches, 1) for ids in array.to_pylist()]
    threaded = [(t, ids) for texts_, array in encode_batches(tok, batches, 3) for t, ids in zip(texts_, array.to_pylist())]
    assert [ids for _, ids in threaded] == single and [t for t, _ in threaded] == texts
    expected = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    assert single == expected
