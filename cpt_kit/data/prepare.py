"""The `prepare` stage: sources -> cleaned, deduplicated, tokenized, packed train/held-out sets.

Writes (all under `data/`, built in a temporary directory and renamed into place, so a crash
never leaves a half-written dataset): `train/`, `heldout/`, `replay_heldout/` (with replay),
`heldout_texts.jsonl`, `tokenizer/`, `tokenizer_extension.json` (with extend_tokenizer),
`stats.json`. See docs/stage-contracts.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cpt_kit.data.corpus import CleanCorpus, build_corpus
from cpt_kit.data.pack import Packed, pack, save_blocks
from cpt_kit.data.sources import ReadOptions, expand_sources, source_fingerprint
from cpt_kit.data.split import grow_to_tokens, heldout_indices
from cpt_kit.data.tokenize import TokenizedDocs, tokenize_documents
from cpt_kit.errors import CptKitError, DataError
from cpt_kit.recipe import Data


@dataclass
class Part:
    """One text collection (the corpus or the replay text) after split, tokenization and packing."""

    corpus: CleanCorpus
    tokens: TokenizedDocs
    train_idx: list[int]
    heldout_idx: list[int]
    train: Packed
    heldout: Packed

    def stats(self) -> dict:
        return {"documents": self.corpus.stats(),
                "split": {"train_documents": len(self.train_idx), "heldout_documents": len(self.heldout_idx)},
                "tokens": {"total": int(self.tokens.lengths.sum()), "train": self.train.tokens,
                           "heldout": self.heldout.tokens, "dropped_train_tail": self.train.dropped_tokens,
                           "dropped_heldout_tail": self.heldout.dropped_tokens},
                "blocks": {"train": self.train.n_blocks, "heldout": self.heldout.n_blocks},
                "words": int(self.tokens.words.sum()), "fertility": self.tokens.fertility()}


def _options(d: Data, text_field: str) -> ReadOptions:
    return ReadOptions(text_field=text_field, encoding_errors=d.encoding_errors, hf_split=d.hf_split,
                       streaming=d.streaming, max_documents=d.max_documents)


def _read(entries, d: Data, text_field: str, key: str, progress, label: str) -> CleanCorpus:
    sources = expand_sources(entries, key)
    task = progress.add_task(f"reading {label}", total=None)
    corpus = build_corpus(sources, _options(d, text_field), min_chars=d.min_chars, max_chars=d.max_chars,
                          dedup_exact=d.dedup_exact, dedup_near=d.dedup_near,
                          near_dup_threshold=d.near_dup_threshold, on_document=lambda: progress.advance(task))
    progress.remove_task(task)
    if len(corpus.texts) < 2:
        dropped = ", ".join(f"{n} {r}" for r, n in corpus.dropped.items() if n) or "none"
        raise DataError(f"{label} has {len(corpus.texts)} usable document(s) after cleaning "
                        f"(read {corpus.read}, dropped: {dropped}); need at least 2 (one is held out)",
                        where=key, hint="add text, or lower data.min_chars / loosen deduplication")
    return corpus


def _tokenize_and_split(corpus: CleanCorpus, tokenizer, d: Data, heldout_fraction: float, block: int,
                        progress, label: str, held: list[int] | None = None) -> Part:
    task = progress.add_task(f"tokenizing {label}", total=len(corpus.texts))
    tokens = tokenize_documents(corpus.texts, tokenizer, d.num_proc, lambda n: progress.advance(task, n))
    progress.remove_task(task)
    held = heldout_indices(corpus.texts, heldout_fraction, d.seed) if held is None else held
    held = grow_to_tokens(corpus.texts, held, tokens.lengths.tolist(), block, d.seed)
    held_set = set(held)
    train_idx = [i for i in range(len(corpus.texts)) if i not in held_set]
    return Part(corpus, tokens, train_idx, held, pack(tokens.ids, train_idx, block), pack(tokens.ids, held, block))


def _check_size(part: Part, d: Data, block: int, label: str, key: str) -> None:
    total = int(part.tokens.lengths.sum())
    where = f"{label} ({len(part.corpus.texts)} documents, {total:,} tokens)"
    if part.heldout.n_blocks == 0:
        raise DataError(f"{where}: the held-out documents have {part.heldout.tokens:,} tokens, fewer than one "
                        f"block of {block}", where=key,
                        hint="add text, or lower model.max_seq_length")
    need = d.min_train_blocks if label == "corpus" else 1
    if part.train.n_blocks < need:
        raise DataError(f"{where}: the training side has {part.train.tokens:,} tokens = {part.train.n_blocks} "
                        f"blocks of {block}; need at least {need} blocks ({need * block:,} tokens)", where=key,
                        hint="add text or lower model.max_seq_length / data.min_train_blocks")


def run(ctx) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from cpt_kit.progress import task_progress

    from cpt_kit.data import extend_tokenizer as ext
    from cpt_kit.data.mix import mix
    from cpt_kit.data.tokenizer_files import load_tokenizer, save_tokenizer
    from cpt_kit.rundir import atomic_path

    recipe, d = ctx.recipe, ctx.recipe.data
    block = recipe.model.max_seq_length
    columns = (TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with task_progress(ctx.console, *columns) as progress:  # plain lines when output is not a terminal
        corpus = _read(d.sources, d, d.text_field, "data.sources", progress, "corpus")
        tokenizer = load_tokenizer(recipe.model)
        held = heldout_indices(corpus.texts, d.heldout_fraction, d.seed)
        extension = None
        if d.extend_tokenizer is not None:
            held_set = set(held)
            extension = ext.extend(tokenizer, [t for i, t in enumerate(corpus.texts) if i not in held_set],
                                   d.extend_tokenizer)
            ctx.log(f"tokenizer extended by {len(extension['added'])} tokens: fertility "
                    f"{extension['fertility_before']} -> {extension['fertility_after']} tokens/word")
        main = _tokenize_and_split(corpus, tokenizer, d, d.heldout_fraction, block, progress, "corpus", held)
        _check_size(main, d, block, "corpus", "data.sources")
        replay = mixed = None
        train_blocks = main.train.blocks
        if d.replay is not None:
            r = d.replay
            rcorpus = _read(r.sources, d, r.text_field, "data.replay.sources", progress, "replay text")
            replay = _tokenize_and_split(rcorpus, tokenizer, d, r.heldout_fraction, block, progress, "replay text")
            _check_size(replay, d, block, "replay text", "data.replay.sources")
            mixed = mix(main.train.blocks, replay.train.blocks, r.fraction, d.seed)
            train_blocks = mixed.blocks
            if mixed.replay_blocks < mixed.wanted_replay_blocks:
                ctx.log(f"[yellow]replay text gives {mixed.replay_blocks} blocks, {mixed.wanted_replay_blocks} "
                        f"wanted for data.replay.fraction={r.fraction}: replay share is {mixed.replay_share}[/yellow]")

    stats = _stats(recipe, main, replay, mixed, extension, len(train_blocks), len(tokenizer))
    with atomic_path(ctx.run.data) as tmp:
        tmp.mkdir(parents=True)
        save_blocks(train_blocks, tmp / "train")
        save_blocks(main.heldout.blocks, tmp / "heldout")
        if replay is not None:
            save_blocks(replay.heldout.blocks, tmp / "replay_heldout")
        with open(tmp / "heldout_texts.jsonl", "w", encoding="utf-8") as handle:
            for i in main.heldout_idx:
                handle.write(json.dumps({"text": corpus.texts[i]}, ensure_ascii=False) + "\n")
        stats["tokenizer_files"] = save_tokenizer(tokenizer, recipe.model, tmp / "tokenizer")
        if extension is not None:
            ext.write_added_tokens_json(extension, tmp / "tokenizer")
            (tmp / "tokenizer_extension.json").write_text(json.dumps(extension, ensure_ascii=False, indent=2) + "\n",
                                                          encoding="utf-8")
        (tmp / "stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    metrics = _metrics(stats, block)
    ctx.log(f"{metrics['documents_kept']:,} documents kept, {metrics['documents_dropped']:,} dropped; "
            f"{metrics['train_blocks']:,} train blocks ({metrics['train_tokens']:,} tokens), "
            f"{metrics['heldout_blocks']:,} held-out blocks; fertility {metrics['fertility']} tokens/word")
    return metrics


def _stats(recipe, main: Part, replay: Part | None, mixed, extension, n_train_blocks: int, vocab: int) -> dict:
    block = recipe.model.max_seq_length
    stats = {"block_size": block, "vocab_size": vocab, "corpus": main.stats(),
             "train": {"blocks": n_train_blocks, "tokens": n_train_blocks * block,
                       "corpus_blocks": main.train.n_blocks, "replay_blocks": mixed.replay_blocks if mixed else 0},
             "heldout": {"blocks": main.heldout.n_blocks, "tokens": main.heldout.n_blocks * block}}
    if replay is not None:
        stats["replay"] = {**replay.stats(), "fraction_wanted": recipe.data.replay.fraction,
                           "share_achieved": mixed.replay_share, "blocks_used": mixed.replay_blocks,
                           "heldout_blocks": replay.heldout.n_blocks}
    if extension is not None:
        stats["tokenizer_extension"] = {"added": len(extension["added"]),
                                        "fertility_before": extension["fertility_before"],
                                        "fertility_after": extension["fertility_after"]}
    return stats


def _metrics(stats: dict, block: int) -> dict:
    docs = stats["corpus"]["documents"]
    replay = stats.get("replay")
    metrics = {
        "documents_read": docs["read"], "documents_kept": docs["kept"],
        "documents_dropped": sum(docs["dropped"].values()), "dropped": docs["dropped"],
        "train_tokens": stats["train"]["tokens"], "train_blocks": stats["train"]["blocks"],
        "heldout_tokens": stats["heldout"]["tokens"], "heldout_blocks": stats["heldout"]["blocks"],
        "corpus_tokens": stats["corpus"]["tokens"]["total"], "fertility": stats["corpus"]["fertility"],
        "block_size": block, "vocab_size": stats["vocab_size"],
    }
    headline = ["train_tokens", "train_blocks", "heldout_blocks", "documents_kept", "documents_dropped", "fertility"]
    if replay is not None:
        metrics.update(replay_tokens=stats["train"]["replay_blocks"] * block, replay_share=replay["share_achieved"],
                       replay_heldout_blocks=replay["heldout_blocks"])
        headline.append("replay_share")
    if "tokenizer_extension" in stats:
        te = stats["tokenizer_extension"]
        metrics.update(new_tokens=te["added"], fertility_before=te["fertility_before"],
                       fertility_after=te["fertility_after"])
        headline += ["new_tokens", "fertility_before", "fertility_after"]
    metrics["headline"] = headline
    return metrics


def input_fingerprint(ctx) -> Any:
    """sha256 of every local input file (names for hub datasets) and of the base tokenizer files."""
    from cpt_kit.data.tokenizer_files import tokenizer_fingerprint

    d = ctx.recipe.data
    try:
        out = {"sources": [source_fingerprint(s) for s in expand_sources(d.sources)]}
        if d.replay is not None:
            out["replay"] = [source_fingerprint(s) for s in expand_sources(d.replay.sources, "data.replay.sources")]
    except CptKitError as exc:  # the stage itself reports this when it runs
        out = {"unresolved": exc.render()}
    out["tokenizer"] = tokenizer_fingerprint(ctx.recipe.model)
    return out
