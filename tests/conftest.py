"""Session fixtures: tiny models and corpora built once, offline (no hub, no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("UNSLOTH_SKIP_TORCHVISION_CHECK", "1")

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "data"


def read_docs(folder: Path) -> list[str]:
    """Documents of a shipped corpus folder: one per file, paragraphs kept."""
    return [p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))]


@pytest.fixture(scope="session")
def general_texts() -> list[str]:
    """General English text (the tiny base model's 'pretraining' language)."""
    return read_docs(EXAMPLES / "general")


@pytest.fixture(scope="session")
def target_texts() -> list[str]:
    """Text in the language the tests teach the model (Esperanto)."""
    return read_docs(EXAMPLES / "esperanto")


def _build(tmp_path_factory, name: str, texts: list[str], **kwargs) -> Path:
    from cpt_kit.tiny_model import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp(name) / "model", texts, **kwargs)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, general_texts) -> Path:
    """Untied tiny Llama, tokenizer trained on English only (so Esperanto is split badly)."""
    return _build(tmp_path_factory, "tiny_base", general_texts)


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory, general_texts) -> Path:
    return _build(tmp_path_factory, "tiny_tied", general_texts, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_chatml(tmp_path_factory, general_texts) -> Path:
    return _build(tmp_path_factory, "tiny_chatml", general_texts, chat_template="chatml")


@pytest.fixture(scope="session")
def tiny_llama3(tmp_path_factory, general_texts) -> Path:
    return _build(tmp_path_factory, "tiny_llama3", general_texts, chat_template="llama3", dtype="bfloat16")


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory, general_texts) -> Path:
    """A tiny byte-level BPE tokenizer (2,000 tokens, GPT-2 pre-tokenizer) trained on the general texts;
    its vocabulary is new, so llama.cpp's converter would not recognise it (use `tiny_bpe` for GGUF)."""
    from cpt_kit.tiny_model import byte_level_bpe_tokenizer
    out = tmp_path_factory.mktemp("bpe_tokenizer")
    byte_level_bpe_tokenizer(general_texts, vocab_size=2000).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bpe(tmp_path_factory, general_texts) -> Path:
    """Untied tiny Llama with a byte-level BPE tokenizer (GPT-2's vocabulary and merges from llama.cpp's own
    test vocabulary, 50,257 tokens): llama.cpp's converter recognises its pre-tokenizer ("gpt-2")."""
    from cpt_kit.tiny_model import byte_level_bpe_tokenizer
    return _build(tmp_path_factory, "tiny_bpe", general_texts, tokenizer=byte_level_bpe_tokenizer())


@pytest.fixture()
def write_corpus(tmp_path):
    """Write documents as .txt files into a fresh folder; returns the folder."""
    def write(docs: list[str], name: str = "corpus") -> Path:
        folder = tmp_path / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, doc in enumerate(docs):
            (folder / f"doc{i:04d}.txt").write_text(doc, encoding="utf-8")
        return folder
    return write


@pytest.fixture()
def tiny_recipe(tiny_base, target_texts, write_corpus):
    """A fast CPT recipe on the tiny base; pass keyword overrides as section dicts."""
    import dataclasses

    from cpt_kit.recipe import Data, Eval, Export, Lora, Model, Recipe, Train

    corpus = write_corpus(target_texts, "esperanto")

    def make(**sections) -> Recipe:
        parts = dict(
            model=Model(base=str(tiny_base), max_seq_length=64, load_in_4bit=False),
            lora=Lora(r=8, lora_alpha=16, use_rslora=True),
            data=Data(sources=(str(corpus),), split_by="file", heldout_fraction=0.1, min_chars=10,
                      min_train_blocks=4),  # write_corpus writes one document per file
            train=Train(backend="hf", learning_rate=2e-3, embedding_learning_rate=5e-4, max_steps=12,
                        per_device_train_batch_size=4, gradient_accumulation_steps=1, eval_steps=6,
                        save_steps=6, warmup_ratio=0.0, gradient_checkpointing=False),
            eval=Eval(prompts=("La kato",), max_new_tokens=8, max_blocks=16),
            export=Export(quantizations=("Q8_0", "Q4_K_M")),
        )
        for key, value in sections.items():
            if isinstance(value, dict):
                parts[key] = dataclasses.replace(parts[key], **value)
            else:
                parts[key] = value
        return Recipe(name="tiny", **parts)

    return make
