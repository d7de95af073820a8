"""The `prepare` stage: sources -> cleaned, deduplicated, tokenized, packed train/held-out sets.

Streams end to end, in memory bounded by a constant plus the deduplication indexes (about 320
bytes per kept document): documents are read in chunks (sources.py, text_files.py), cleaned and
deduplicated one at a time (corpus.py), tokenized in threads and spilled with their token ids
to an Arrow file (spill.py), split by document with a minimum held-out size (split.py), then
read back once to pack blocks straight into the output datasets (pack.py), with replay blocks
interleaved (mix.py). With extend_tokenizer the spill is text-only first and tokenized after
the extension. Replay text is read only until it gives what the mix needs.

Writes (all under `data/`, built in a temporary directory, then each entry renamed into place, so
a crash never leaves a half-written dataset): `train/`, `heldout/`, `replay_heldout/` (with replay),
`heldout_texts.jsonl`, `tokenizer/`, `tokenizer_extension.json` (with extend_tokenizer),
`stats.json`. See docs/stage-contracts.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

from cpt_kit.data.corpus import Cleaning, CorpusStats, clean_documents
from cpt_kit.data.pack import BlockWriter
from cpt_kit.data.part import Part, need_heldout_tokens
from cpt_kit.data.sources import ReadOptions, expand_sources, source_fingerprint
from cpt_kit.data.spill import Spilled, collect
from cpt_kit.data.tokenize import text_batches
from cpt_kit.errors import CptKitError, DataError
from cpt_kit.recipe import Data

PROGRESS_EVERY = 1000


def _documents(entries, d: Data, text_field: str, key: str, stats: CorpusStats, progress, label: str,
               streaming: bool) -> Iterator[str]:
    """The kept documents' texts, streamed; advances a progress bar."""
    options = ReadOptions(split_by=d.split_by, long_document_chars=d.long_document_chars, text_field=text_field,
                          encoding_errors=d.encoding_errors, hf_split=d.hf_split, streaming=streaming,
                          max_documents=d.max_documents)
    cleaning = Cleaning(collapse_whitespace=d.collapse_whitespace, min_chars=d.min_chars, max_chars=d.max_chars,
                        dedup_exact=d.dedup_exact, dedup_near=d.dedup_near, near_dup_threshold=d.near_dup_threshold)
    task = progress.add_task(f"reading and tokenizing {label}", total=None)
    for n, (text, _) in enumerate(clean_documents(expand_sources(entries, key), options, cleaning, stats), start=1):
        if n % PROGRESS_EVERY == 0:
            progress.update(task, completed=n)
        yield text
    progress.remove_task(task)


def _check_documents(stats: CorpusStats, label: str, key: str) -> None:
    if stats.kept >= 2:
        return
    raise DataError(f"{label} has {stats.kept} usable document(s) after cleaning (read {stats.read}, dropped: "
                    f"{stats.drops_summary()}); need at least 2 (one is held out)", where=key,
                    hint=f"text files are cut into documents by data.split_by (now {stats.split_by!r}): for a corpus "
                         "in one file use 'paragraph' (blank lines), 'line' or a separator regex; otherwise add "
                         "text, or lower data.min_chars / loosen deduplication")


def _read_corpus(d: Data, tokenizer, progress, work: Path, ctx) -> tuple[Spilled, CorpusStats, Any]:
    """The corpus, spilled and tokenized (after extending the tokenizer when the recipe asks)."""
    from cpt_kit.data import extend_tokenizer as ext

    stats = CorpusStats(split_by=d.split_by)
    docs = _documents(d.sources, d, d.text_field, "data.sources", stats, progress, "corpus", d.streaming)
    if d.extend_tokenizer is None:
        spilled = collect(text_batches(docs), work / "corpus.arrow", d.seed, tokenizer, d.num_proc)
        _check_documents(stats, "corpus", "data.sources")
        return spilled, stats, None
    texts = collect(text_batches(docs), work / "corpus-text.arrow", d.seed)
    _check_documents(stats, "corpus", "data.sources")
    train_side = texts.texts(lambda i: texts.positions[i] >= d.heldout_fraction)
    extension = ext.extend(tokenizer, train_side, d.extend_tokenizer)
    ctx.log(f"tokenizer extended by {len(extension['added'])} tokens: fertility "
            f"{extension['fertility_before']} -> {extension['fertility_after']} tokens/word")
    return texts.tokenized(work / "corpus.arrow", tokenizer, d.num_proc), stats, extension


def _read_replay(d: Data, tokenizer, progress, work: Path, wanted_blocks: int, block: int) -> tuple[Spilled, CorpusStats]:
    """Replay text, streamed, read only until it gives the wanted blocks plus its held-out set.

    Enough means: the training side (split position >= the replay held-out fraction) covers the
    wanted blocks plus what the held-out side still lacks of its minimum, plus a margin of one
    block and the largest document seen; and the text read is large enough for that minimum to
    fit within data.heldout_max_share.
    """
    r = d.replay
    stats = CorpusStats(split_by=d.split_by)
    docs = _documents(r.sources, d, r.text_field, "data.replay.sources", stats, progress, "replay text", True)
    need_held = need_heldout_tokens(d, block)
    seen = {"train": 0, "held": 0, "largest": 0}

    def enough(positions, ids) -> bool:
        import numpy as np

        lengths = np.diff(ids.offsets.to_numpy())
        held = np.asarray(positions) < r.heldout_fraction
        seen["held"] += int(lengths[held].sum())
        seen["train"] += int(lengths[~held].sum())
        seen["largest"] = max(seen["largest"], int(lengths.max(initial=0)))
        margin = block + seen["largest"]
        done = (seen["train"] >= wanted_blocks * block + max(0, need_held - seen["held"]) + margin
                and seen["train"] + seen["held"] >= need_held / d.heldout_max_share)
        stats.stopped_early |= done
        return done

    spilled = collect(text_batches(docs), work / "replay.arrow", d.seed, tokenizer, d.num_proc, stop=enough)
    _check_documents(stats, "replay text", "data.replay.sources")
    return spilled, stats


def run(ctx) -> dict[str, Any]:
    if ctx.recipe.train.objective == "sft":  # chat data: cpt_kit.sft.prepare
        from cpt_kit.sft.prepare import run as prepare_chat
        return prepare_chat(ctx)
    from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

    from cpt_kit.data import extend_tokenizer as ext
    from cpt_kit.data.mix import interleave, replay_blocks_wanted, select_evenly
    from cpt_kit.data.tokenize import special_ids
    from cpt_kit.data.tokenizer_files import load_tokenizer, save_tokenizer
    from cpt_kit.progress import task_progress
    from cpt_kit.rundir import atomic_entries

    recipe, d = ctx.recipe, ctx.recipe.data
    block = recipe.model.max_seq_length
    tokenizer = load_tokenizer(recipe.model)
    columns = (SpinnerColumn(), TextColumn("  {task.description}: {task.completed:,} documents"), TimeElapsedColumn())
    with atomic_entries(ctx.run.data) as tmp:  # replaces its own entries of data/, nothing else there
        work = tmp / "spill"
        work.mkdir()
        with task_progress(ctx.console, *columns) as progress:  # plain lines when output is not a terminal
            spilled, read, extension = _read_corpus(d, tokenizer, progress, work, ctx)
            specials = 1 + (special_ids(tokenizer)[0] is not None)
            main = Part.split("corpus", "data.sources", read, spilled, d.heldout_fraction, d, block, specials)
            main.check(d.min_train_blocks, d.heldout_max_share, ctx.log)
            replay = None
            wanted = used = 0
            if d.replay is not None:
                wanted = replay_blocks_wanted(main.train_blocks, d.replay.fraction)
                rspilled, rread = _read_replay(d, tokenizer, progress, work, wanted, block)
                replay = Part.split("replay text", "data.replay.sources", rread, rspilled, d.replay.heldout_fraction,
                                    d, block, specials)
                replay.check(1, d.heldout_max_share, ctx.log)
                used = min(wanted, replay.train_blocks)
                if used < wanted:
                    ctx.log(f"[yellow]replay text gives {used} blocks, {wanted} wanted for data.replay.fraction="
                            f"{d.replay.fraction}: replay share is {round(used / (main.train_blocks + used), 4)}"
                            "[/yellow]")

        with BlockWriter(tmp / "train", block) as train, BlockWriter(tmp / "heldout", block) as heldout, \
                open(tmp / "heldout_texts.jsonl", "w", encoding="utf-8") as heldout_texts:
            chunks = main.blocks(heldout, heldout_texts)
            if replay is not None:
                with BlockWriter(tmp / "replay_heldout", block) as replay_heldout:
                    replay_chunks = select_evenly(replay.blocks(replay_heldout), replay.train_blocks, used)
                    for chunk in interleave(chunks, main.train_blocks, replay_chunks, used):
                        train.write(chunk)
                    for _ in replay_chunks:  # the rest only writes replay held-out blocks
                        pass
                for _ in chunks:  # ...and corpus held-out blocks after the last training block
                    pass
            else:
                for chunk in chunks:
                    train.write(chunk)
        shutil.rmtree(work)
        stats = _stats(recipe, main, replay, used, extension, train.blocks, len(tokenizer))
        stats["tokenizer_files"] = save_tokenizer(tokenizer, recipe.model, tmp / "tokenizer")
        if extension is not None:
            ext.write_added_tokens_json(extension, tmp / "tokenizer")
            (tmp / "tokenizer_extension.json").write_text(json.dumps(extension, ensure_ascii=False, indent=2) + "\n",
                                                          encoding="utf-8")
        (tmp / "stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    metrics = _metrics(stats, block)
    ctx.log(f"{metrics['documents_kept']:,} documents kept, {metrics['documents_dropped']:,} dropped; "
            f"{metrics['train_blocks']:,} train blocks ({metrics['train_tokens']:,} tokens), "
            f"{metrics['heldout_blocks']:,} held-out blocks ({metrics['heldout_tokens']:,} tokens); "
            f"fertility {metrics['fertility']} tokens/word")
    return metrics


def _stats(recipe, main: Part, replay: Part | None, replay_used: int, extension, n_train_blocks: int,
           vocab: int) -> dict:
    block = recipe.model.max_seq_length
    stats = {"block_size": block, "vocab_size": vocab, "corpus": main.stats(),
             "train": {"blocks": n_train_blocks, "tokens": n_train_blocks * block,
                       "corpus_blocks": main.train_blocks, "replay_blocks": replay_used},
             "heldout": {"blocks": main.heldout_blocks, "tokens": main.heldout_blocks * block,
                         "documents": int(main.held.mask.sum()), "wanted_tokens": main.held.need_tokens,
                         "reached_minimum": not main.held.capped}}
    if replay is not None:
        stats["replay"] = {**replay.stats(), "fraction_wanted": recipe.data.replay.fraction,
                           "share_achieved": round(replay_used / max(1, n_train_blocks), 4),
                           "blocks_used": replay_used, "heldout_blocks": replay.heldout_blocks}
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
