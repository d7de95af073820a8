"""Tiny Llama-architecture models with SentencePiece (or byte-level BPE) tokenizers, built offline.

Used by the offline demo recipe and by the tests: no hub download, real architecture, a real
SentencePiece `tokenizer.model` (llama.cpp's converter recognises it), hidden size 256 so that
K-quants (row sizes multiple of 256) work. Variants: tied embeddings, a ChatML or Llama-3 style
chat template with its special tokens, any weight dtype, several safetensors shards.
"""

from __future__ import annotations

import io
import json
import random
import tempfile
from pathlib import Path
from typing import Iterable, Optional

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
LLAMA3_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def train_sentencepiece(texts: Iterable[str], out_file: Path, vocab_size: int = 1000,
                        user_symbols: tuple[str, ...] = ()) -> Path:
    """Train a Llama-style SentencePiece BPE model (byte fallback, <unk>=0, <s>=1, </s>=2)."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([t for t in texts if t.strip()]), model_writer=buffer,
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=list(user_symbols),
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", num_threads=2, minloglevel=2, hard_vocab_limit=False,
    )
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_bytes(buffer.getvalue())
    return out_file


GPT2_VOCAB = "models/ggml-vocab-gpt-2.gguf"
"""GPT-2's vocabulary and merges, as llama.cpp's own tokenizer tests ship them (in the same sdist as the converter)."""


def byte_level_bpe_tokenizer(texts: Optional[list[str]] = None, *, vocab_size: int = 1000,
                             gguf_vocab: Optional[Path] = None, specials: tuple[str, ...] = ("<|endoftext|>",)):
    """A byte-level BPE tokenizer (GPT-2 / Llama-3 / Qwen style), built offline with `tokenizers`.

    With `texts`: trained on them (`vocab_size`), GPT-2's pre-tokenizer regex. llama.cpp's converter
    names the pre-tokenizer by hashing the ids of a fixed text, so a newly trained vocabulary is never
    recognised, whatever its regex ("BPE pre-tokenizer was not recognized"). With `gguf_vocab` (default:
    llama.cpp's GPT-2 test vocabulary, 50,257 tokens): GPT-2's exact vocabulary and merges, which the
    converter recognises as "gpt-2". The first of `specials` is bos, eos and unk; no BOS is added (GPT-2).
    Returns a transformers PreTrainedTokenizerFast.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is not None:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator([t for t in texts if t.strip()], trainer)
    else:
        import gguf

        from cpt_kit.export.llama_cpp import llama_cpp_dir

        reader = gguf.GGUFReader(str(gguf_vocab or llama_cpp_dir() / GPT2_VOCAB))

        def strings(key: str) -> list[str]:
            field = reader.fields[key]
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

        vocab = {token: i for i, token in enumerate(strings("tokenizer.ggml.tokens"))}
        merges = [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.add_special_tokens([s for s in specials if s in vocab])
    tok.decoder = decoders.ByteLevel()
    first = specials[0]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=first, eos_token=first, unk_token=first)
    fast.add_special_tokens({"additional_special_tokens": list(specials[1:])})
    return fast


def build_tiny_model(out_dir: str | Path, texts: list[str], *, vocab_size: int = 1000, hidden_size: int = 256,
                     num_layers: int = 2, num_heads: int = 4, intermediate_size: int = 512,
                     tie_word_embeddings: bool = False, chat_template: Optional[str] = None,
                     dtype: str = "float32", max_shard_size: str = "5GB", seed: int = 0,
                     tokenizer=None) -> Path:
    """Write a randomly initialised tiny LlamaForCausalLM + SentencePiece tokenizer to `out_dir`.

    chat_template: None (base model), "chatml" or "llama3" (adds that family's special tokens).
    tokenizer: a ready tokenizer to use instead (e.g. `byte_level_bpe_tokenizer()`); saved as it is.
    """
    from transformers import LlamaTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    symbols = {"chatml": CHATML_TOKENS, "llama3": LLAMA3_TOKENS, None: ()}[chat_template]
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
        return _write_model(out_dir, tokenizer, hidden_size, intermediate_size, num_layers, num_heads,
                            tie_word_embeddings, dtype, max_shard_size, seed)
    with tempfile.TemporaryDirectory() as sp_dir:  # only tokenizer.model there: transformers converts it
        sp_file = train_sentencepiece(texts, Path(sp_dir) / "tokenizer.model", vocab_size, symbols)
        # legacy=True: "▁" before the text that follows a special token, which is what llama.cpp's
        # SentencePiece tokenizer does; with legacy=False HF and GGUF ids differ after special tokens.
        tokenizer = LlamaTokenizer.from_pretrained(sp_dir, add_bos_token=True, add_eos_token=False, legacy=True)
        sp_bytes = sp_file.read_bytes()
    if symbols:
        tokenizer.add_special_tokens({"additional_special_tokens": list(symbols)})
    if chat_template == "chatml":
        tokenizer.chat_template = CHATML_TEMPLATE
        tokenizer.eos_token = "<|im_end|>"
    elif chat_template == "llama3":
        tokenizer.chat_template = LLAMA3_TEMPLATE
        tokenizer.eos_token = "<|eot_id|>"
    tokenizer.save_pretrained(out_dir)
    config_file = out_dir / "tokenizer_config.json"  # transformers 5 rebuilds from this flag on load
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "legacy": True}, indent=2))
    # transformers 5 writes only tokenizer.json; llama.cpp's converter wants the SentencePiece model.
    (out_dir / "tokenizer.model").write_bytes(sp_bytes)
    return _write_model(out_dir, tokenizer, hidden_size, intermediate_size, num_layers, num_heads,
                        tie_word_embeddings, dtype, max_shard_size, seed)


def _write_model(out_dir: Path, tokenizer, hidden_size: int, intermediate_size: int, num_layers: int,
                 num_heads: int, tie_word_embeddings: bool, dtype: str, max_shard_size: str, seed: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    random.seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None, torch_dtype=dtype,
    )
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    return out_dir


def pretrain_tiny_model(model_dir: str | Path, texts: list[str], *, steps: int = 200, seq_len: int = 128,
                        batch_size: int = 8, learning_rate: float = 3e-3, seed: int = 0, progress=None) -> list[float]:
    """A short plain-PyTorch pretraining of a tiny model in place, so the demo base is not noise.

    Returns the loss per step. This is deliberately minimal: it only has to give the base some
    general-language knowledge before the demo's continued pretraining on another language.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    blocks = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    if len(blocks) == 0:
        raise ValueError(f"pretraining text has {len(ids)} tokens, fewer than one block of {seq_len}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        batch = blocks[torch.randint(len(blocks), (batch_size,), generator=generator)].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress is not None:
            progress(losses[-1])
    model.save_pretrained(model_dir)
    return losses


DEMO_BASE = {"format": 2, "vocab_size": 1000, "pretrain_steps": 80, "seq_len": 128, "batch_size": 8, "learning_rate": 3e-3}


def cache_dir() -> Path:
    import os
    return Path(os.environ.get("CPT_KIT_CACHE", Path.home() / ".cache" / "cpt-kit"))


def _tiny_base_texts(text_folder: Path) -> list[str]:
    from cpt_kit.errors import RecipeError

    if not Path(text_folder).is_dir():
        raise RecipeError(f"tiny:{text_folder}: {text_folder} is not a folder", where="model.base",
                          hint="tiny:FOLDER needs a folder of plain-text (.txt) documents to build the tiny base from")
    files = sorted(Path(text_folder).glob("*.txt"))
    if not files:
        raise RecipeError(f"no .txt files in {text_folder} to build the tiny base model from", where="model.base",
                          hint="tiny:FOLDER needs a folder of plain-text documents")
    return [f.read_text(encoding="utf-8") for f in files]


def tiny_base_digest(text_folder: Path) -> str:
    """Identity of the tiny base built from `text_folder` (its texts and the build settings)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps([_tiny_base_texts(text_folder), DEMO_BASE]).encode()).hexdigest()[:12]


def cached_tiny_base(text_folder: Path) -> Path:
    """The demo's base model: a tiny Llama whose tokenizer and weights come from the .txt files in
    `text_folder` (short general pretraining). Built once per content hash, then reused."""
    from cpt_kit.rundir import atomic_path

    target = cache_dir() / f"tiny-base-{tiny_base_digest(text_folder)}"
    if (target / "config.json").is_file():
        return target
    texts = _tiny_base_texts(text_folder)
    print(f"building the tiny base model from {len(texts)} documents in {text_folder} -> {target}")
    with atomic_path(target) as tmp:
        build_tiny_model(tmp, texts, vocab_size=DEMO_BASE["vocab_size"])
        losses = pretrain_tiny_model(tmp, texts, steps=DEMO_BASE["pretrain_steps"], seq_len=DEMO_BASE["seq_len"],
                                     batch_size=DEMO_BASE["batch_size"], learning_rate=DEMO_BASE["learning_rate"])
        print(f"tiny base pretrained: loss {losses[0]:.2f} -> {sum(losses[-10:]) / 10:.2f}")
    return target
