"""Tokenizer extension: fewer tokens per word, identical round trip, correct init_ids, and the same
ids in HF, SentencePiece and llama.cpp (new pieces live in tokenizer.model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpt_kit.data import prepare
from cpt_kit.data.clean import clean_text
from cpt_kit.errors import DataError
from cpt_kit.manifest import Manifest
from cpt_kit.pipeline import StageContext
from cpt_kit.recipe import TokenizerExtension
from cpt_kit.rundir import RunDir

SPACE = "\u2581"


def run_prepare(recipe, root):
    from rich.console import Console

    run = RunDir(root)
    ctx = StageContext(recipe, run, Manifest.load(run.manifest), Console(quiet=True))
    return prepare.run(ctx), run


def split(target_texts):
    docs = [clean_text(t) for t in target_texts]
    return docs[:-8], docs[-8:]


@pytest.fixture(scope="module")
def extended(tiny_base, target_texts, tmp_path_factory):
    """(base tokenizer, extended tokenizer, record, directory with the saved extended tokenizer)."""
    from transformers import AutoTokenizer

    from cpt_kit.data import extend_tokenizer as ext

    train, _ = split(target_texts)
    base = AutoTokenizer.from_pretrained(str(tiny_base))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    record = ext.extend(tokenizer, train, TokenizerExtension(max_new_tokens=120, min_frequency=3, min_subtokens=3))
    out = tmp_path_factory.mktemp("extended") / "tokenizer"
    tokenizer.save_pretrained(str(out))
    assert ext.write_tokenizer_files(record, out) == ["tokenizer.model"]
    return base, tokenizer, record, out


def sp_processor(path: Path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


def test_extension_shortens_tokenization_and_round_trips(tiny_recipe, tiny_base, target_texts, tmp_path):
    from transformers import AutoTokenizer

    spec = TokenizerExtension(max_new_tokens=40, min_frequency=3, min_subtokens=3)
    metrics, run = run_prepare(tiny_recipe(data={"extend_tokenizer": spec}), tmp_path / "run")
    ext = json.loads((run.data / "tokenizer_extension.json").read_text())
    base = AutoTokenizer.from_pretrained(str(tiny_base))
    extended = AutoTokenizer.from_pretrained(str(run.tokenizer))

    assert ext["method"] == "sentencepiece"
    assert 0 < len(ext["added"]) <= 40 and metrics["new_tokens"] == len(ext["added"])
    assert len(extended) == len(base) + len(ext["added"]) == ext["vocab_size"]
    assert ext["fertility_after"] < ext["fertility_before"]
    assert [e["id"] for e in ext["added"]] == list(range(len(base), len(base) + len(ext["added"])))
    for entry in ext["added"]:
        assert extended.convert_tokens_to_ids(entry["token"]) == entry["id"]
        assert entry["init_ids"] and max(entry["init_ids"]) < len(base)
    words = [e for e in ext["added"] if e["kind"] == "word"]
    assert words and all(e["frequency"] >= 3 and len(e["init_ids"]) >= 3 for e in words)
    # new pieces are normal SentencePiece pieces, not HF added tokens
    assert not [t for i, t in extended.added_tokens_decoder.items() if i >= len(base)]
    sp = sp_processor(run.tokenizer / "tokenizer.model")
    assert sp.get_piece_size() == len(extended)
    assert not (run.tokenizer / "added_tokens.json").exists()
    assert json.loads((run.tokenizer / "tokenizer_config.json").read_text()).get("legacy") is True

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


def test_new_words_are_single_pieces_with_old_ids_as_init(extended):
    base, tokenizer, record, out = extended
    sp = sp_processor(out / "tokenizer.model")
    assert record["fertility_after"] < record["fertility_before"]
    assert len(record["added"]) <= 120 and len(tokenizer) == len(base) + len(record["added"])
    words = [e for e in record["added"] if e["kind"] == "word"]
    assert len(words) == record["words"] > 10
    for entry in record["added"]:
        text = entry["token"].replace(SPACE, " ")
        assert sp.id_to_piece(entry["id"]) == entry["token"]
        assert sp.decode([entry["id"]]).strip() == text.strip()
        if entry["token"].startswith(SPACE):  # the old tokenizer's ids for " word" in running text
            assert entry["init_ids"] == base("x" + text, add_special_tokens=False)["input_ids"][1:] or \
                entry["init_ids"] == base(text.strip(), add_special_tokens=False)["input_ids"]
        else:  # a character the base only had as bytes
            assert len(entry["init_ids"]) > 1 and base.decode(entry["init_ids"]) == text
    for entry in words:
        word = entry["token"][1:]
        assert tokenizer(f"la {word}", add_special_tokens=False)["input_ids"][-1:] == [entry["id"]]
        assert sp.encode(f"la {word}")[-1:] == [entry["id"]]
        assert tokenizer(f"la {word}", add_special_tokens=False)["input_ids"] == sp.encode(f"la {word}")


def test_heldout_round_trip_and_hf_equals_sentencepiece(extended, target_texts):
    base, tokenizer, _, out = extended
    sp = sp_processor(out / "tokenizer.model")
    _, held = split(target_texts)
    before = after = 0
    for doc in held:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == doc
        assert ids == sp.encode(doc)
        with_bos = tokenizer(doc)["input_ids"]
        assert with_bos == [tokenizer.bos_token_id] + ids
        before += len(base(doc, add_special_tokens=False)["input_ids"])
        after += len(ids)
    assert after < 0.9 * before
    # the saved tokenizer loads back identically
    from transformers import AutoTokenizer
    reloaded = AutoTokenizer.from_pretrained(str(out))
    assert all(reloaded(d)["input_ids"] == tokenizer(d)["input_ids"] for d in held)


def test_chat_tokenizer_keeps_special_tokens_and_template(tiny_chatml, target_texts):
    from transformers import AutoTokenizer

    from cpt_kit.data import extend_tokenizer as ext

    train, held = split(target_texts)
    base = AutoTokenizer.from_pretrained(str(tiny_chatml))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_chatml))
    record = ext.extend(tokenizer, train, TokenizerExtension(max_new_tokens=30, min_frequency=3, min_subtokens=3))
    assert len(record["added"]) == 30
    assert tokenizer.chat_template == base.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert {i: t.content for i, t in tokenizer.added_tokens_decoder.items()} == \
        {i: t.content for i, t in base.added_tokens_decoder.items()}
    messages = [{"role": "user", "content": held[0][:200]}]
    rendered = base.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(rendered)["input_ids"]
    base_ids = base(rendered)["input_ids"]
    assert len(ids) < len(base_ids) and ids[:2] == base_ids[:2] and ids[-3:] == base_ids[-3:]
    assert tokenizer.decode(ids) == base.decode(base_ids)


def test_added_tokens_beyond_sentencepiece_model_are_refused(tiny_base, target_texts):
    from transformers import AutoTokenizer

    from cpt_kit.data import extend_tokenizer as ext

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    with pytest.raises(DataError, match="beyond its SentencePiece model"):
        ext.extend(tokenizer, split(target_texts)[0], TokenizerExtension(max_new_tokens=10, min_frequency=3))


def test_bpe_symbols_follow_sentencepiece(extended):
    from cpt_kit.data.extend_tokenizer import bpe_symbols, load_proto

    base, _, _, _ = extended
    proto = load_proto(Path(base.vocab_file))
    scores = {p.piece: p.score for p in proto.pieces if p.type == p.NORMAL}
    for word in ("kato", "estas", "the", "internacia", "lingvo"):
        symbols = bpe_symbols(SPACE + word, scores)
        ids = base(word, add_special_tokens=False)["input_ids"]
        assert base.convert_ids_to_tokens(ids) == symbols


@pytest.mark.slow
def test_extended_tokenizer_in_gguf_tokenizes_like_hf(extended, tiny_base, target_texts, tmp_path):
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM

    from cpt_kit.export.gguf import convert_to_gguf

    _, tokenizer, record, out = extended
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model_dir = tmp_path / "model"
    model.save_pretrained(str(model_dir))
    for item in out.iterdir():
        (model_dir / item.name).write_bytes(item.read_bytes())
    gguf = tmp_path / "tiny-F16.gguf"
    convert_to_gguf(model_dir, gguf, "f16")

    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    assert llm.n_vocab() == len(tokenizer)
    _, held = split(target_texts)
    words = " ".join(e["token"][1:] for e in record["added"] if e["kind"] == "word")
    for text in held + [words, "La kato kaj la hundo estas ĉe la domo."]:
        assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == tokenizer(text)["input_ids"], text[:80]
