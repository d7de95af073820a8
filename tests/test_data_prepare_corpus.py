"""prepare on real-shaped corpora: one big file, a meaningful held-out set, replay read with a cap."""

from __future__ import annotations

import io
import json

import pytest

from cpt_kit.data import prepare
from cpt_kit.errors import DataError
from cpt_kit.manifest import Manifest
from cpt_kit.pipeline import StageContext
from cpt_kit.rundir import RunDir


def run_prepare(recipe, root):
    from rich.console import Console

    log = io.StringIO()
    run = RunDir(root)
    ctx = StageContext(recipe, run, Manifest.load(run.manifest), Console(file=log, width=400))
    metrics = prepare.run(ctx)
    return metrics, json.loads((run.data / "stats.json").read_text()), log.getvalue()


def paragraphs(texts):
    return [p.strip() for text in texts for p in text.split("\n\n") if len(p.strip()) >= 10]


@pytest.fixture()
def one_file_corpus(target_texts, tmp_path):
    """The Esperanto texts as one dump file, paragraphs separated by blank lines (like eo.txt)."""
    path = tmp_path / "eo.txt"
    path.write_text("\n\n".join(paragraphs(target_texts)) + "\n", encoding="utf-8")
    return path


def test_one_big_file_is_split_into_paragraph_documents(tiny_recipe, target_texts, one_file_corpus, tmp_path):
    recipe = tiny_recipe(data={"sources": (str(one_file_corpus),), "split_by": "paragraph"})
    metrics, stats, _ = run_prepare(recipe, tmp_path / "run")
    docs = stats["corpus"]["documents"]
    expected = len(set(paragraphs(target_texts)))
    assert docs["read"] == len(paragraphs(target_texts)) and docs["kept"] == expected - docs["dropped"]["near_duplicate"]
    assert docs["split_by"] == "paragraph"
    assert docs["per_source"] == {str(one_file_corpus): {"read": docs["read"], "kept": docs["kept"]}}
    assert metrics["train_blocks"] >= 4 and metrics["heldout_blocks"] >= 1


def test_one_file_as_one_document_names_the_option(tiny_recipe, one_file_corpus, tmp_path):
    recipe = tiny_recipe(data={"sources": (str(one_file_corpus),), "split_by": "file"})
    with pytest.raises(DataError) as info:
        run_prepare(recipe, tmp_path / "run")
    message = info.value.render()
    assert "1 usable document(s)" in message and "data.split_by (now 'file')" in message
    assert "'paragraph'" in message and not (tmp_path / "run" / "data").exists()


def test_heldout_grows_to_the_minimum_and_stats_record_it(tiny_recipe, one_file_corpus, tmp_path):
    data = {"sources": (str(one_file_corpus),), "split_by": "paragraph", "heldout_fraction": 0.01, "heldout_min_blocks": 16,
            "heldout_min_tokens": 0, "heldout_max_share": 0.3}
    metrics, stats, log = run_prepare(tiny_recipe(data=data), tmp_path / "run")
    held = stats["heldout"]
    assert held["blocks"] >= 16 and held["reached_minimum"] and held["wanted_tokens"] == 16 * 64
    assert held["tokens"] == held["blocks"] * 64 == metrics["heldout_tokens"]
    assert held["documents"] == stats["corpus"]["split"]["heldout_documents"] > 0.01 * stats["corpus"]["documents"]["kept"]
    assert "too small" not in log
    # 1% alone would have been far less than 16 blocks
    fraction_only = {**data, "heldout_min_blocks": 1, "heldout_min_tokens": 0}
    _, small, _ = run_prepare(tiny_recipe(data=fraction_only), tmp_path / "small")
    assert small["heldout"]["blocks"] < 16


def test_small_corpus_warns_when_the_cap_stops_the_heldout_set(tiny_recipe, one_file_corpus, tmp_path):
    data = {"sources": (str(one_file_corpus),), "split_by": "paragraph", "heldout_min_blocks": 400, "heldout_max_share": 0.2}
    metrics, stats, log = run_prepare(tiny_recipe(data=data), tmp_path / "run")
    assert not stats["heldout"]["reached_minimum"] and stats["heldout"]["wanted_tokens"] == 400 * 64
    assert stats["corpus"]["tokens"]["heldout"] <= 0.2 * stats["corpus"]["tokens"]["total"]
    assert "too small" in log and "data.heldout_max_share=0.2" in log and "400 wanted" in log


def test_long_documents_are_cut_and_counted_in_stats(tiny_recipe, target_texts, write_corpus, tmp_path):
    book = " ".join(" ".join(t.split()) for t in target_texts[:30])  # one line, no paragraph breaks
    corpus = write_corpus(list(target_texts[30:]) + [book], "books")
    data = {"sources": (str(corpus),), "long_document_chars": 2000}
    _, stats, _ = run_prepare(tiny_recipe(data=data), tmp_path / "run")
    long = stats["corpus"]["documents"]["long_documents"]
    assert long["documents"] >= 1 and long["pieces_added"] >= len(book) // 2000
    assert long["cut_at"]["space"] >= len(book) // 2000 and long["cut_at"]["hard"] == 0


@pytest.mark.parametrize("kind", ["jsonl", "hf"])
def test_replay_is_read_only_until_it_gives_enough(kind, tiny_recipe, general_texts, tmp_path, monkeypatch):
    """A JSONL file, and a dataset loaded with load_dataset (hf:, streamed as a hub dataset would be)."""
    import numpy as np

    from cpt_kit.data import tokenize

    monkeypatch.setattr(tokenize, "BATCH_CHARS", 20_000)  # small batches: reading stops at a batch end

    rows = []
    rng = np.random.default_rng(0)
    sentences = paragraphs(general_texts)
    for i in range(3000):  # far more general text than 10% replay needs
        rows.append({"text": f"{i}. " + " ".join(rng.choice(sentences, size=2))})
    replay_file = tmp_path / "general" / "data" / "train.jsonl"
    replay_file.parent.mkdir(parents=True)
    replay_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    from cpt_kit.recipe import Replay

    source = str(replay_file) if kind == "jsonl" else f"hf:{tmp_path / 'general'}"
    recipe = tiny_recipe(data={"dedup_near": False, "replay": Replay(sources=(source,), fraction=0.1,
                                                                     heldout_fraction=0.05)})
    metrics, stats, _ = run_prepare(recipe, tmp_path / "run")
    replay = stats["replay"]
    assert replay["documents"]["stopped_early"] and replay["documents"]["read"] < 3000 / 2
    assert stats["train"]["replay_blocks"] == round(0.1 / 0.9 * stats["train"]["corpus_blocks"])
    assert replay["heldout_blocks"] >= 1 and abs(metrics["replay_share"] - 0.1) < 0.03
