"""Tokenizer extension on a byte-level BPE tokenizer (GPT-2 / Llama-3 / Qwen style): extend, train, merge,
convert, and the GGUF tokenizes the new words exactly like Hugging Face."""

from __future__ import annotations

import json
import re
from hashlib import sha256

import pytest

from cpt_kit.recipe import Export, Model, TokenizerExtension
from stage_helpers import run_until


def converter_hashes() -> tuple[str, dict[str, str]]:
    """llama.cpp's check text and its known pre-tokenizer hashes (hash -> name), read from the converter."""
    from cpt_kit.export.llama_cpp import llama_cpp_dir

    source = (llama_cpp_dir() / "conversion" / "base.py").read_text(encoding="utf-8")
    chktxt = eval(re.search(r"chktxt = ('.*')\n", source).group(1))  # a plain string literal
    known = dict(re.findall(r'if chkhsh == "([0-9a-f]+)":\n\s+# ref: .*\n\s+res = "([^"]+)"', source))
    return chktxt, known


def pre_tokenizer_name(tokenizer) -> str | None:
    chktxt, known = converter_hashes()
    return known.get(sha256(str(tokenizer.encode(chktxt)).encode()).hexdigest())


def test_only_a_known_vocabulary_gives_a_known_pre_tokenizer_hash(bpe_tokenizer_dir, tiny_bpe):
    """The converter hashes the ids of a fixed text: a newly trained byte-level BPE is unknown even with
    GPT-2's regex; GPT-2's own vocabulary (the tiny_bpe fixture) is recognised as "gpt-2"."""
    from transformers import AutoTokenizer

    assert pre_tokenizer_name(AutoTokenizer.from_pretrained(bpe_tokenizer_dir)) is None
    tokenizer = AutoTokenizer.from_pretrained(tiny_bpe)
    assert pre_tokenizer_name(tokenizer) == "gpt-2" and len(tokenizer) == 50257


@pytest.mark.slow
def test_bpe_extension_trains_merges_converts_with_identical_ids(tiny_bpe, tiny_recipe, target_texts, tmp_path):
    import llama_cpp
    from transformers import AutoTokenizer

    from cpt_kit.data.clean import clean_text

    recipe = tiny_recipe(model=Model(base=str(tiny_bpe), max_seq_length=64, load_in_4bit=False),
                         data={"extend_tokenizer": TokenizerExtension(max_new_tokens=40, min_frequency=3,
                                                                      min_subtokens=3)},
                         export=Export(quantizations=("Q8_0",)))
    root = tmp_path / "run"
    run_until(recipe, root, until="gguf")

    record = json.loads((root / "data" / "tokenizer_extension.json").read_text(encoding="utf-8"))
    base = AutoTokenizer.from_pretrained(tiny_bpe)
    merged = AutoTokenizer.from_pretrained(root / "merged")
    words = [e["token"] for e in record["added"]]
    assert record["method"] == "added_tokens" and words and len(merged) == len(base) + len(words)
    assert record["fertility_after"] < record["fertility_before"]
    assert pre_tokenizer_name(merged) == "gpt-2"  # the new tokens leave the converter's check text alone

    ggufs = sorted((root / "gguf").glob("*-F16.gguf"))
    llm = llama_cpp.Llama(model_path=str(ggufs[0]), vocab_only=True, verbose=False)
    assert llm.n_vocab() == len(merged)
    sentence = "".join(words)  # each new word with its leading space, back to back
    docs = [clean_text(t) for t in target_texts][-6:]
    for text in [sentence, f"Saluton!{sentence}.", *docs]:
        hf = merged(text)["input_ids"]
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == hf, text[:80]
    for word in words:  # every new word is one token, the same id, in both
        hf = merged(word, add_special_tokens=False)["input_ids"]
        assert len(hf) == 1 and llm.tokenize(word.encode("utf-8"), add_bos=False, special=True) == hf
