"""Tokenizer extension: fewer tokens per word, identical round trip, correct init_ids."""

from __future__ import annotations

import json

from cpt_kit.data import prepare
from cpt_kit.data.clean import clean_text
from cpt_kit.manifest import Manifest
from cpt_kit.pipeline import StageContext
from cpt_kit.recipe import TokenizerExtension
from cpt_kit.rundir import RunDir


def run_prepare(recipe, root):
    from rich.console import Console

    run = RunDir(root)
    ctx = StageContext(recipe, run, Manifest.load(run.manifest), Console(quiet=True))
    return prepare.run(ctx), run


def test_extension_shortens_tokenization_and_round_trips(tiny_recipe, tiny_base, target_texts, tmp_path):
    from transformers import AutoTokenizer

    spec = TokenizerExtension(max_new_tokens=40, min_frequency=3, min_subtokens=3)
    metrics, run = run_prepare(tiny_recipe(data={"extend_tokenizer": spec}), tmp_path / "run")
    ext = json.loads((run.data / "tokenizer_extension.json").read_text())
    base = AutoTokenizer.from_pretrained(str(tiny_base))
    extended = AutoTokenizer.from_pretrained(str(run.tokenizer))

    assert 0 < len(ext["added"]) <= 40 and metrics["new_tokens"] == len(ext["added"])
    assert len(extended) == len(base) + len(ext["added"]) == ext["vocab_size"]
    assert ext["fertility_after"] < ext["fertility_before"]
    for entry in ext["added"]:
        assert entry["token"].startswith(" ") and entry["id"] >= len(base)
        assert extended.convert_tokens_to_ids(entry["token"]) == entry["id"]
        assert entry["init_ids"] == base(entry["token"], add_special_tokens=False)["input_ids"]
        assert len(entry["init_ids"]) >= 3 and max(entry["init_ids"]) < len(base)
        assert entry["frequency"] >= 3
    assert not any(t.special for t in extended.added_tokens_decoder.values() if t.content.startswith(" "))

    docs = [clean_text(t) for t in target_texts]
    before = sum(len(base(d, add_special_tokens=False)["input_ids"]) for d in docs)
    after = sum(len(extended(d, add_special_tokens=False)["input_ids"]) for d in docs)
    assert after < 0.97 * before
    for doc in docs:
        ids = extended(doc, add_special_tokens=False)["input_ids"]
        assert extended.decode(ids) == doc
    # the packed training data uses the extended vocabulary
    import datasets
    train = datasets.load_from_disk(str(run.data / "train"))
    assert max(max(row) for row in train["input_ids"]) >= len(base)
    # llama.cpp's SentencePiece converter reads added tokens from added_tokens.json
    added = json.loads((run.tokenizer / "added_tokens.json").read_text())
    assert added == {e["token"]: e["id"] for e in ext["added"]}
