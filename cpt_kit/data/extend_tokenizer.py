"""Tokenizer extension for a new language: add frequent words the tokenizer splits badly.

Candidates are whole words (letter runs) that follow a space, occur at least `min_frequency`
times and take at least `min_subtokens` tokens. How they are added depends on the tokenizer:

SentencePiece tokenizers (a `tokenizer.model` next to the tokenizer; Llama-2, Mistral, the tiny
test models): the new vocabulary goes INTO the SentencePiece model, as normal pieces. Added
(user-defined) tokens cannot be used there: llama.cpp's SentencePiece tokenizer treats them as
special fragments and puts a "▁" before the text that follows them (so does HF with
legacy=True), so " kato" as an added token never tokenizes the same in llama.cpp and HF. A
SentencePiece BPE model encodes by merging adjacent symbols, always the pair whose merged piece
has the highest score, so a new piece "▁kato" is only reached through a chain of merges of
pieces in the vocabulary. Each word gets the chain of its left-to-right prefixes over its current
segmentation ("▁k" "at" "o" -> "▁kat" -> "▁kato"), characters the model lacks (byte fallback)
are added as single-character pieces first (HF's BPE turns unknown characters into bytes before
merging), and all new pieces get scores below every existing piece, in the order they are
added: the old merges all happen first, exactly as before, then the new ones extend the word at
its left edge. The intermediate pieces count towards `max_new_tokens`; words are taken greedily
by tokens saved per new piece. Every word is checked with the real SentencePieceProcessor on
the new model (it must encode as one piece; words that do not are dropped), and the rebuilt HF
tokenizer must give the same ids as SentencePiece. The new model replaces `tokenizer.model` and
the HF tokenizer is rebuilt from it (same class, special tokens, chat template, bos/eos/pad,
legacy flag); new ids follow the existing pieces. llama.cpp's converter reads pieces, scores and
types from tokenizer.model, so the GGUF tokenizes the same way. Only BPE SentencePiece models
are supported (not Unigram).

Byte-level BPE tokenizers (no tokenizer.model: Llama-3, Qwen, GPT-2 style): the words are added
as normal (non-special) HF added tokens whose content includes the leading space (" kato");
llama.cpp's BPE tokenizer matches added tokens on the raw text with no space-prefix rule around
them, so HF and the GGUF agree.

`init_ids` of every new token are the ids the OLD tokenizer gives its text, so the train stage
can initialise the new embedding rows with their mean (cpt_kit/train/embeddings.py).
"""

from __future__ import annotations

import heapq
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Optional

from cpt_kit.errors import DataError
from cpt_kit.recipe import TokenizerExtension

WORD = re.compile(r"(?<= )[^\W\d_]+")
MAX_CANDIDATES = 50_000
SAMPLE_CHARS = 20_000_000
SPACE = "\u2581"
SENTENCEPIECE_FILE = "tokenizer.model"
WHERE = "data.extend_tokenizer"


class ExtensionRecord(dict):
    """The tokenizer_extension.json content (a plain dict to json), plus the new tokenizer.model bytes
    (`sentencepiece_model`, None for the added-token path), which json never sees."""

    sentencepiece_model: Optional[bytes] = None


def sample(texts: list[str], max_chars: int = SAMPLE_CHARS) -> list[str]:
    """The first documents up to max_chars characters (deterministic)."""
    out, total = [], 0
    for text in texts:
        if total >= max_chars:
            break
        out.append(text)
        total += len(text)
    return out


def fertility(tokenizer, texts: list[str]) -> float:
    """Tokens per whitespace-separated word (special tokens not counted)."""
    if not texts:
        return 0.0
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    words = sum(len(t.split()) for t in texts)
    return round(sum(map(len, ids)) / max(1, words), 4)


def frequent_words(texts: list[str], spec: TokenizerExtension) -> list[tuple[str, int]]:
    counts: Counter = Counter()
    for text in texts:
        counts.update(WORD.findall(text))
    return [(w, c) for w, c in counts.most_common(MAX_CANDIDATES) if c >= spec.min_frequency]


def sentencepiece_file(tokenizer) -> Optional[Path]:
    """The tokenizer.model the HF tokenizer was loaded with, if any."""
    candidates = [getattr(tokenizer, "vocab_file", None)]
    if getattr(tokenizer, "name_or_path", None):
        candidates.append(Path(tokenizer.name_or_path).expanduser() / SENTENCEPIECE_FILE)
    for candidate in candidates:
        if candidate and str(candidate).endswith(".model") and Path(candidate).is_file():
            return Path(candidate)
    return None


def extend(tokenizer, texts: list[str], spec: TokenizerExtension,
           sp_model: Optional[Path] = None) -> ExtensionRecord:
    """Extend `tokenizer` IN PLACE; returns the tokenizer_extension.json content.

    sp_model: the base's tokenizer.model (default: the one the tokenizer was loaded from). With
    one, the record's `sentencepiece_model` holds the new model: write it with
    `write_tokenizer_files` after `save_pretrained`.
    """
    sp_model = Path(sp_model) if sp_model else sentencepiece_file(tokenizer)
    if sp_model is not None:
        return _extend_sentencepiece(tokenizer, texts, spec, sp_model)
    return _extend_added_tokens(tokenizer, texts, spec)


def write_tokenizer_files(extension: dict, tokenizer_dir: Path) -> list[str]:
    """After `save_pretrained(tokenizer_dir)`: the extended tokenizer.model (SentencePiece path).

    Returns the names written. The added-token path needs nothing beyond save_pretrained.
    """
    model = getattr(extension, "sentencepiece_model", None)
    if model is None:
        return []
    (Path(tokenizer_dir) / SENTENCEPIECE_FILE).write_bytes(model)
    return [SENTENCEPIECE_FILE]


# prepare.py's older name for the hook (it no longer writes added_tokens.json)
write_added_tokens_json = write_tokenizer_files


def _settings(spec: TokenizerExtension) -> dict:
    return {"max_new_tokens": spec.max_new_tokens, "min_frequency": spec.min_frequency,
            "min_subtokens": spec.min_subtokens}


def _round_trips(tokenizer, texts: list[str]) -> list[bool]:
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return [tokenizer.decode(ids) == text for ids, text in zip(encoded, texts)]


def _check_round_trips(tokenizer, probe: list[str], before: list[bool]) -> None:
    broken = [i for i, (was, now) in enumerate(zip(before, _round_trips(tokenizer, probe[:200]))) if was and not now]
    if broken:
        raise DataError(f"the extended tokenizer no longer decodes {len(broken)} document(s) back to their text "
                        f"(first: document {broken[0]})", where=WHERE,
                        hint="this tokenizer's pre-tokenizer is not supported for extension; "
                             "set data.extend_tokenizer=None")


# --- byte-level BPE: HF added tokens ------------------------------------------------------------

def choose_tokens(tokenizer, texts: list[str], spec: TokenizerExtension) -> list[dict]:
    """Added-token path: the words to add, best first: {"token", "frequency", "init_ids"}."""
    frequent = frequent_words(texts, spec)
    if not frequent:
        return []
    vocab = tokenizer.get_vocab()
    pieces = [" " + w for w, _ in frequent]
    encoded = tokenizer(pieces, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    scored = []
    for (word, count), piece, ids in zip(frequent, pieces, encoded):
        if len(ids) >= spec.min_subtokens and piece not in vocab:
            scored.append((count * (len(ids) - 1), word, {"token": piece, "frequency": count, "init_ids": ids}))
    scored.sort(key=lambda item: (-item[0], item[1]))
    return [entry for _, _, entry in scored[: spec.max_new_tokens]]


def _extend_added_tokens(tokenizer, texts: list[str], spec: TokenizerExtension) -> ExtensionRecord:
    from transformers import AddedToken

    probe = sample(texts)
    before = fertility(tokenizer, probe)
    base_vocab_size = len(tokenizer)
    chosen = choose_tokens(tokenizer, probe, spec)
    round_trips_before = _round_trips(tokenizer, probe[:200])
    tokenizer.add_tokens([AddedToken(c["token"], normalized=False, special=False, single_word=False,
                                     lstrip=False, rstrip=False) for c in chosen])
    added = [{"token": c["token"], "id": tokenizer.convert_tokens_to_ids(c["token"]),
              "init_ids": c["init_ids"], "frequency": c["frequency"]} for c in chosen]
    after = fertility(tokenizer, probe)
    _check_round_trips(tokenizer, probe, round_trips_before)
    return ExtensionRecord(added=added, method="added_tokens", base_vocab_size=base_vocab_size,
                           vocab_size=len(tokenizer), fertility_before=before, fertility_after=after,
                           sample_documents=len(probe), settings=_settings(spec))


# --- SentencePiece: pieces in the model ---------------------------------------------------------

def load_proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto


def _processor(proto, raw: bool = False):
    """A SentencePieceProcessor for `proto`; raw: no dummy prefix / whitespace cleanup, so " kato"
    is encoded as exactly the text "▁kato"."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    if raw:
        copy = sentencepiece_model_pb2.ModelProto()
        copy.CopyFrom(proto)
        copy.normalizer_spec.add_dummy_prefix = False
        copy.normalizer_spec.remove_extra_whitespaces = False
        proto = copy
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto.SerializeToString())
    return sp


def bpe_symbols(text: str, scores: dict[str, float]) -> list[str]:
    """SentencePiece BPE's segmentation of `text` ("▁kato") before byte fallback: start from the
    characters, repeatedly merge the adjacent pair whose concatenation is a piece with the highest
    score (leftmost first on ties), as bpe_model.cc and llama.cpp's SPM tokenizer do."""
    symbols = list(text)
    while len(symbols) > 1:
        best, best_at = None, -1
        for i in range(len(symbols) - 1):
            score = scores.get(symbols[i] + symbols[i + 1])
            if score is not None and (best is None or score > best):
                best, best_at = score, i
        if best is None:
            break
        symbols[best_at:best_at + 2] = [symbols[best_at] + symbols[best_at + 1]]
    return symbols


def _plan_word(symbols: list[str], vocab: set[str]) -> list[tuple[str, str]]:
    """New pieces (piece, kind) a word needs: missing characters, then its left-to-right prefixes."""
    needed = [(c, "character") for c in dict.fromkeys("".join(symbols)) if c not in vocab]
    prefix = symbols[0]
    for i, symbol in enumerate(symbols[1:], start=1):
        prefix += symbol
        if prefix not in vocab:
            needed.append((prefix, "word" if i == len(symbols) - 1 else "intermediate"))
    return needed


def _select(candidates: list[dict], vocab: set[str], budget: int) -> tuple[list[tuple[str, str]], list[dict]]:
    """Greedy by tokens saved per new piece; a piece shared by several words (a common prefix) is
    paid once, and the words waiting for it become cheaper as soon as it is taken."""
    added: dict[str, str] = {}
    chosen: list[dict] = []
    users: dict[str, list[int]] = {}
    for i, c in enumerate(candidates):
        for piece, _ in c["plan"]:
            users.setdefault(piece, []).append(i)
    cost = [len(c["plan"]) for c in candidates]
    heap = [(-c["saving"] / max(1, cost[i]), i, cost[i]) for i, c in enumerate(candidates)]
    heapq.heapify(heap)
    done: set[int] = set()
    while heap and len(added) < budget:
        _, i, at_cost = heapq.heappop(heap)
        if i in done or at_cost != cost[i]:
            continue  # taken, or an outdated entry (a cheaper one is in the heap)
        if cost[i] > budget - len(added):
            continue
        done.add(i)
        chosen.append(candidates[i])
        for piece, kind in candidates[i]["plan"]:
            if piece in added:
                continue
            added[piece] = kind
            for j in users[piece]:
                if j not in done:
                    cost[j] -= 1
                    heapq.heappush(heap, (-candidates[j]["saving"] / max(1, cost[j]), j, cost[j]))
    return list(added.items()), chosen


def _build_proto(base, pieces: list[tuple[str, str]]):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.CopyFrom(base)
    floor = min((p.score for p in base.pieces if p.type == p.NORMAL), default=0.0)
    for k, (piece, _) in enumerate(pieces):
        new = proto.pieces.add()
        new.piece, new.score, new.type = piece, floor - 1.0 - k, sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    return proto


def _check_base(tokenizer, proto, path: Path) -> None:
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        kind = proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)
        raise DataError(f"{path} is a SentencePiece {kind} model; extension supports only BPE models",
                        where=WHERE, hint="set data.extend_tokenizer=None for this base model")
    size = len(proto.pieces)
    beyond = sorted((i, t.content) for i, t in tokenizer.added_tokens_decoder.items() if i >= size)
    if beyond:
        shown = ", ".join(f"{c!r} (id {i})" for i, c in beyond[:5])
        raise DataError(f"the base tokenizer has {len(beyond)} added token(s) with ids beyond its SentencePiece "
                        f"model ({size} pieces in {path}): {shown}; new pieces take the ids from {size} on and "
                        f"would collide with them", where=WHERE,
                        hint="use a base whose special tokens are part of tokenizer.model, or set "
                             "data.extend_tokenizer=None")
    hf = tokenizer.convert_ids_to_tokens(list(range(min(size, 2000))))
    sp = [p.piece for p in proto.pieces[:len(hf)]]
    if hf != sp:
        first = next(i for i, (a, b) in enumerate(zip(hf, sp)) if a != b)
        raise DataError(f"the HF tokenizer and {path} disagree on id {first} ({hf[first]!r} vs {sp[first]!r})",
                        where=WHERE, hint="the tokenizer.model does not belong to this tokenizer; "
                                          "set data.extend_tokenizer=None")


def special_token_flags(tokenizer) -> dict:
    """{"add_bos_token", "add_eos_token"} as the tokenizer behaves (transformers 5's attributes may
    say False while tokenizer.json's post-processor adds BOS)."""
    from cpt_kit.bos import adds_bos

    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    extra = len(with_special) > len(plain)
    return {"add_bos_token": adds_bos(tokenizer),
            "add_eos_token": bool(extra and tokenizer.eos_token_id is not None
                                  and with_special[-1] == tokenizer.eos_token_id)}


def rebuild_hf_tokenizer(tokenizer, model_bytes: bytes):
    """The base HF tokenizer's class built from a new tokenizer.model, with the base's
    tokenizer_config (special tokens, chat template, legacy, bos/eos flags) carried over."""
    kwargs = special_token_flags(tokenizer)
    if getattr(tokenizer, "legacy", None) is not None:
        kwargs["legacy"] = tokenizer.legacy
    with tempfile.TemporaryDirectory(prefix="cpt-kit-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        for name in ("tokenizer.json", "added_tokens.json"):
            (Path(tmp) / name).unlink(missing_ok=True)
        (Path(tmp) / SENTENCEPIECE_FILE).write_bytes(model_bytes)
        try:
            new = type(tokenizer).from_pretrained(tmp, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure here means: this tokenizer cannot be rebuilt
            raise DataError(f"cannot rebuild the {type(tokenizer).__name__} from the extended tokenizer.model: "
                            f"{type(exc).__name__}: {exc}", where=WHERE,
                            hint="set data.extend_tokenizer=None for this base model") from None
        for key in ("vocab_file",):
            if hasattr(new, key):
                setattr(new, key, None)  # the temporary file is gone
    new.name_or_path = tokenizer.name_or_path
    new.init_kwargs.update(kwargs)  # save_pretrained writes them to tokenizer_config.json
    present = {t.content for t in new.added_tokens_decoder.values()}
    missing = [t for _, t in sorted(tokenizer.added_tokens_decoder.items()) if t.content not in present]
    if missing:  # e.g. "</s>" when the chat template's end-of-turn token is the eos
        new.add_tokens(missing, special_tokens=True)
    problems = []
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template"):
        if getattr(new, attr, None) != getattr(tokenizer, attr, None):
            problems.append(f"{attr}: {getattr(tokenizer, attr, None)!r} -> {getattr(new, attr, None)!r}")
    old_special = {i: (t.content, t.special) for i, t in tokenizer.added_tokens_decoder.items()}
    new_special = {i: (t.content, t.special) for i, t in new.added_tokens_decoder.items()}
    if old_special != new_special:
        problems.append(f"added tokens {old_special} -> {new_special}")
    probe = "".join(f"{t} a" for t in tokenizer.all_special_tokens) + " a"
    if special_token_flags(new) != special_token_flags(tokenizer) or \
            tokenizer(probe)["input_ids"] != new(probe)["input_ids"]:
        problems.append(f"{probe!r}: {tokenizer(probe)['input_ids']} -> {new(probe)['input_ids']}")
    if problems:
        raise DataError("the tokenizer rebuilt from the extended tokenizer.model differs from the base: "
                        + "; ".join(problems), where=WHERE,
                        hint="set data.extend_tokenizer=None for this base model")
    return new


def _extend_sentencepiece(tokenizer, texts: list[str], spec: TokenizerExtension, path: Path) -> ExtensionRecord:
    base = load_proto(path)
    _check_base(tokenizer, base, path)
    size = len(base.pieces)
    probe = sample(texts)
    before = fertility(tokenizer, probe)
    round_trips_before = _round_trips(tokenizer, probe[:200])
    old_raw = _processor(base, raw=True)
    scores = {p.piece: p.score for p in base.pieces if p.type == p.NORMAL}
    vocab = {p.piece for p in base.pieces}

    candidates = []
    for word, count in frequent_words(probe, spec):
        text = SPACE + word
        if text in vocab:
            continue
        old_ids = old_raw.encode(" " + word)
        if len(old_ids) < spec.min_subtokens:
            continue
        symbols = bpe_symbols(text, scores)
        candidates.append({"word": word, "frequency": count, "saving": count * (len(old_ids) - 1),
                           "plan": _plan_word(symbols, vocab)})

    dropped: list[str] = []
    model_bytes, pieces, chosen, sp_new = base.SerializeToString(), [], [], None
    for _ in range(5):  # drop words SentencePiece does not reach, pick again with what is left
        pieces, chosen = _select([c for c in candidates if c["word"] not in dropped], vocab, spec.max_new_tokens)
        proto = _build_proto(base, pieces)
        sp_new = _processor(proto, raw=True)
        failed = [c["word"] for c in chosen if len(sp_new.encode(" " + c["word"])) != 1]
        if not failed:
            model_bytes = proto.SerializeToString()
            break
        dropped += failed
    else:
        pieces, chosen = [], []
    new = rebuild_hf_tokenizer(tokenizer, model_bytes)
    if len(new) != size + len(pieces):
        raise DataError(f"the rebuilt tokenizer has {len(new)} tokens, expected {size} + {len(pieces)}", where=WHERE,
                        hint="set data.extend_tokenizer=None for this base model")
    _check_same_as_sentencepiece(tokenizer, new, base, model_bytes, probe[:200])

    frequency = {c["word"]: c["frequency"] for c in chosen}
    added = []
    for piece, kind in pieces:
        word = piece[1:] if piece.startswith(SPACE) else None
        entry = {"token": piece, "id": new.convert_tokens_to_ids(piece),
                 "init_ids": old_raw.encode(piece.replace(SPACE, " ")),
                 "kind": "word" if word in frequency else kind}
        if word in frequency:
            entry["frequency"] = frequency[word]
        added.append(entry)

    # the caller's tokenizer object becomes the extended one (prepare.py holds on to it)
    tokenizer.__dict__.clear()
    tokenizer.__dict__.update(new.__dict__)
    after = fertility(tokenizer, probe)
    _check_round_trips(tokenizer, probe, round_trips_before)
    record = ExtensionRecord(added=added, method="sentencepiece", base_vocab_size=size, vocab_size=len(tokenizer),
                             fertility_before=before, fertility_after=after, sample_documents=len(probe),
                             words=len(chosen), dropped_words=dropped, settings=_settings(spec))
    record.sentencepiece_model = model_bytes
    return record


def _check_same_as_sentencepiece(old, new, base_proto, model_bytes: bytes, docs: list[str]) -> None:
    """HF ids == SentencePiece ids on sample documents (those that already agreed before)."""
    import sentencepiece as spm

    sp_old = _processor(base_proto)
    sp_new = spm.SentencePieceProcessor()
    sp_new.LoadFromSerializedProto(model_bytes)
    hf_old = old(docs, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    hf_new = new(docs, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    bad = [i for i, doc in enumerate(docs)
           if hf_old[i] == sp_old.encode(doc) and hf_new[i] != sp_new.encode(doc)]
    if bad:
        raise DataError(f"the rebuilt HF tokenizer and SentencePiece tokenize {len(bad)} sample document(s) "
                        f"differently (first: document {bad[0]})", where=WHERE,
                        hint="please report this; set data.extend_tokenizer=None to go on without extension")
