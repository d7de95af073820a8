"""The report's "Data" section, from `data/stats.json` as prepare writes it: for continued pretraining
the corpus (and replay text) documents read, kept and dropped by reason, tokens, blocks, fertility
and a tokenizer extension; for chat fine-tuning the conversations and their trained tokens."""

from __future__ import annotations

from typing import Any

from cpt_kit.report.facts import Facts
from cpt_kit.report.render import Block, Heading, Plot, Table, Text, fmt


def data(facts: Facts, has_plot: bool) -> list[Block]:
    stats = facts.stats
    if not stats or facts.documents() is None:
        return []
    blocks: list[Block] = [Heading("Data")]
    blocks += _conversations(stats) if facts.unit == "conversations" else _corpus(stats)
    if has_plot:
        blocks.append(Plot("report/data.png", f"{facts.unit.capitalize()} kept, and dropped by reason"))
    return blocks


def _counts(documents: dict[str, Any]) -> list[tuple[str, Any]]:
    return ([("read", documents.get("read")), ("kept", documents["kept"])]
            + [(f"dropped: {reason}", n) for reason, n in (documents.get("dropped") or {}).items()])


def _corpus(stats: dict[str, Any]) -> list[Block]:
    corpus, replay = stats["corpus"], stats.get("replay")
    if replay:
        replayed = dict(_counts(replay["documents"]))
        counts = Table(("documents", "corpus", "replay text"),
                       tuple((label, fmt(n), fmt(replayed.get(label))) for label, n in _counts(corpus["documents"])))
    else:
        counts = Table(("documents", "corpus"), tuple((label, fmt(n)) for label, n in _counts(corpus["documents"])))
    train, heldout, block = stats.get("train", {}), stats.get("heldout", {}), stats.get("block_size")
    rows = [("corpus tokens", corpus["tokens"]["total"]), ("corpus words", corpus.get("words")),
            ("fertility (tokens per word)", corpus.get("fertility")),
            (f"training blocks of {fmt(block)} tokens", train.get("blocks")),
            ("training blocks from the corpus", train.get("corpus_blocks")),
            ("training blocks from replay text", train.get("replay_blocks")),
            ("training tokens", train.get("tokens")),
            ("held-out blocks", heldout.get("blocks")), ("held-out tokens", heldout.get("tokens"))]
    if replay:
        rows += [("replay share of training blocks", replay.get("share_achieved")),
                 ("replay share wanted", replay.get("fraction_wanted")),
                 ("replay held-out blocks", replay.get("heldout_blocks"))]
    extension = stats.get("tokenizer_extension")
    if extension:
        rows += [("tokenizer extension: new tokens", extension["added"]),
                 ("fertility before the extension", extension["fertility_before"]),
                 ("fertility after the extension", extension["fertility_after"])]
    rows.append(("vocabulary", stats.get("vocab_size")))
    return [counts, Table(("prepared", "value"), tuple((label, fmt(v)) for label, v in rows if v is not None)),
            Text("Fertility is tokens per word: lower means the tokenizer fits the language better"
                 + (" (before/after the extension: measured on a sample of the corpus)." if extension else "."))]


def _conversations(stats: dict[str, Any]) -> list[Block]:
    conversations = stats["conversations"]
    counts = _counts(conversations) + [("truncated at a turn boundary", conversations.get("truncated"))]
    train, heldout = stats.get("train", {}), stats.get("heldout", {})
    rows = tuple((label, fmt(train.get(key)), fmt(heldout.get(key)))
                 for key, label in (("conversations", "conversations"), ("tokens", "tokens"),
                                    ("trained_tokens", "trained tokens (assistant turns)"),
                                    ("trained_share", "trained share"), ("mean_length", "mean length (tokens)"),
                                    ("longest", "longest (tokens)")) if key in train)
    template = stats.get("chat_template") or {}
    added = template.get("added_tokens") or []
    return [Table(("conversations", "count"), tuple((label, fmt(n)) for label, n in counts if n is not None)),
            Table(("prepared", "train", "held out"), rows),
            Text(f"Chat template: {template.get('family', '?')} ({template.get('origin', '?')}); "
                 + (f"new special tokens {', '.join(f'`{t}`' for t in added)}; " if added else "")
                 + f"conversations longer than {fmt(stats.get('max_seq_length'))} tokens: "
                 + f"{stats.get('overlong_policy', '?')}. Only the assistant turns are trained.")]
