"""The prepare stage for train.objective="sft": chat rows -> tokenized, label-masked examples.

Streams every source row by row (nothing is held whole: the examples go to Arrow files as they
are made): normalise (messages / ShareGPT / question-answer), validate, add the recipe's system
prompt, drop exact duplicates, split by conversation (a hash of the conversation decides, as for
CPT documents), render with the chat template, label assistant tokens only, apply the
over-length policy. Writes its entries of data/ (built in a temporary directory, each renamed into
place; anything else in data/ is left as it is):
`train/`, `heldout/` (columns input_ids, labels; one conversation per row, variable length),
`heldout_texts.jsonl` (rendered held-out conversations and their messages: verify's tokenizer
probes and stop prompt),
`tokenizer/` (with the chat template training used), `tokenizer_extension.json` (when control
or pad tokens were added), `chat_template.json` and `stats.json` (every drop counted by reason).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from cpt_kit.data.sources import ReadOptions, expand_sources
from cpt_kit.data.split import split_position
from cpt_kit.errors import DataError
from cpt_kit.sft.conversations import ChatDataError, canonical, conversation, read_rows
from cpt_kit.sft.masking import Example, fit


class ExampleWriter:
    """Appends examples to an Arrow file (datasets' ArrowWriter) and keeps the running totals."""

    def __init__(self, path: Path):
        from datasets import Features, Sequence, Value
        from datasets.arrow_writer import ArrowWriter

        self.path = path
        features = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32"))})
        self.writer = ArrowWriter(features=features, path=str(path))
        self.rows = self.tokens = self.trained = self.longest = 0

    def add(self, example: Example) -> None:
        self.writer.write({"input_ids": example.input_ids, "labels": example.labels})
        self.rows += 1
        self.tokens += len(example.input_ids)
        self.trained += example.trained
        self.longest = max(self.longest, len(example.input_ids))

    def save(self, out_dir: Path) -> None:
        import datasets

        self.writer.finalize()
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            datasets.Dataset.from_file(str(self.path)).save_to_disk(str(out_dir))
        finally:
            if bars:
                datasets.enable_progress_bars()

    def stats(self) -> dict[str, Any]:
        return {"conversations": self.rows, "tokens": self.tokens, "trained_tokens": self.trained,
                "trained_share": round(self.trained / self.tokens, 4) if self.tokens else 0.0,
                "mean_length": round(self.tokens / self.rows, 1) if self.rows else 0.0, "longest": self.longest}


def _log_drop(ctx, dropped: Counter, reason: str, where: str) -> None:
    if dropped[reason] <= 3:
        ctx.log(f"[yellow]dropped ({reason}): {where}[/yellow]")


def run(ctx) -> dict[str, Any]:
    from cpt_kit.data.tokenizer_files import load_tokenizer, save_tokenizer
    from cpt_kit.rundir import atomic_entries
    from cpt_kit.sft.templates import setup_chat_template

    recipe, d, spec = ctx.recipe, ctx.recipe.data, ctx.recipe.sft
    tokenizer = load_tokenizer(recipe.model)
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("assistant-only labels need a fast (Rust) tokenizer with offset mappings",
                        where="model.tokenizer", hint="use a tokenizer that ships tokenizer.json")
    setup = setup_chat_template(tokenizer, spec)
    for note in setup.notes:
        ctx.log(note)
    counts: Counter = Counter()
    dropped: Counter = Counter()
    candidate: Optional[tuple[float, Example, tuple]] = None  # lowest-position train example (held out if none is)
    with atomic_entries(ctx.run.data) as tmp:  # replaces its own entries of data/, nothing else there
        train, heldout = ExampleWriter(tmp / "train.arrow"), ExampleWriter(tmp / "heldout.arrow")
        with open(tmp / "heldout_texts.jsonl", "w", encoding="utf-8") as texts:
            for position, example, messages in _examples(ctx, tokenizer, setup.end_of_turn_ids, counts, dropped):
                if position < d.heldout_fraction:
                    _hold_out(heldout, texts, tokenizer, example, messages)
                    continue
                if candidate is None or position < candidate[0]:
                    candidate, example = (position, example, messages), (candidate[1] if candidate else None)
                if example is not None:
                    train.add(example)
            if candidate is not None:  # at least one held-out conversation: the lowest-position one
                if heldout.rows == 0 and train.rows > 0:
                    _hold_out(heldout, texts, tokenizer, candidate[1], candidate[2])
                else:
                    train.add(candidate[1])
        if train.rows == 0 or heldout.rows == 0:
            reasons = ", ".join(f"{n} {r}" for r, n in dropped.items()) or "none"
            raise DataError(f"{counts['read']} conversation(s) read, {train.rows + heldout.rows} usable "
                            f"(dropped: {reasons}); need at least 2 (one is held out)", where="data.sources",
                            hint="add conversations, or raise model.max_seq_length if they were too long")
        train.save(tmp / "train")
        heldout.save(tmp / "heldout")
        (tmp / "train.arrow").unlink()
        (tmp / "heldout.arrow").unlink()
        files = save_tokenizer(tokenizer, recipe.model, tmp / "tokenizer")
        chat = setup.to_json(tokenizer)
        (tmp / "chat_template.json").write_text(json.dumps(chat, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        if setup.added:
            extension = {"method": "chat_template", "added": setup.added, "base_vocab_size": len(tokenizer) -
                         len(setup.added)}
            (tmp / "tokenizer_extension.json").write_text(json.dumps(extension, ensure_ascii=False, indent=2) + "\n",
                                                          encoding="utf-8")
        stats = {"objective": "sft", "max_seq_length": recipe.model.max_seq_length, "vocab_size": len(tokenizer),
                 "chat_template": chat, "overlong_policy": spec.overlong,
                 "conversations": {"read": counts["read"], "kept": train.rows + heldout.rows,
                                   "dropped": dict(dropped), "truncated": counts["truncated"]},
                 "train": train.stats(), "heldout": heldout.stats(), "tokenizer_files": files}
        (tmp / "stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return _metrics(ctx, stats)


def _examples(ctx, tokenizer, end_of_turn_ids, counts: Counter, dropped: Counter):
    """(split position, example, messages kept) for each usable conversation of every source, in order;
    invalid (with sft.invalid="drop"), duplicate and too-long conversations are counted and skipped."""
    d, spec = ctx.recipe.data, ctx.recipe.sft
    options = ReadOptions(hf_split=d.hf_split, streaming=d.streaming, max_documents=d.max_documents,
                          encoding_errors=d.encoding_errors)
    seen: set[bytes] = set()
    for source in expand_sources(d.sources):
        for row, where in read_rows(source, options):
            counts["read"] += 1
            try:
                conv = conversation(row, spec, where)
            except ChatDataError as exc:
                if spec.invalid == "error":
                    raise
                dropped[exc.reason] += 1
                _log_drop(ctx, dropped, exc.reason, where)
                continue
            key = canonical(conv.messages)
            digest = hashlib.sha256(key.encode("utf-8")).digest()[:16]
            if digest in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(digest)
            example = fit(tokenizer, conv.messages, end_of_turn_ids, ctx.recipe.model.max_seq_length,
                          spec.overlong, where)
            if example is None:
                dropped["too_long"] += 1
                _log_drop(ctx, dropped, "too_long", where)
                continue
            if example.turns < len(conv.messages):
                counts["truncated"] += 1
            yield split_position(key, d.seed), example, conv.messages[:example.turns]


def _hold_out(heldout: ExampleWriter, texts, tokenizer, example: Example, messages) -> None:
    """A held-out example, and its rendered text as Ollama would send it (no BOS: the runner adds it)."""
    from cpt_kit.sft.templates import prompt_adds_bos

    text = example.text if prompt_adds_bos(tokenizer, example.text) else example.text[len(tokenizer.bos_token):]
    heldout.add(example)
    texts.write(json.dumps({"text": text, "messages": list(messages)}, ensure_ascii=False) + "\n")


def _metrics(ctx, stats: dict) -> dict[str, Any]:
    conv, train = stats["conversations"], stats["train"]
    metrics = {"conversations_read": conv["read"], "conversations_kept": conv["kept"],
               "conversations_dropped": sum(conv["dropped"].values()), "dropped": conv["dropped"],
               "truncated": conv["truncated"], "train_conversations": train["conversations"],
               "heldout_conversations": stats["heldout"]["conversations"], "train_tokens": train["tokens"],
               "trained_token_share": train["trained_share"], "chat_template": stats["chat_template"]["family"],
               "added_tokens": stats["chat_template"]["added_tokens"],
               "headline": ["conversations_kept", "conversations_dropped", "train_tokens", "trained_token_share",
                            "chat_template"]}
    ctx.log(f"{conv['kept']:,} conversations kept ({train['conversations']:,} train / "
            f"{stats['heldout']['conversations']:,} held out), {metrics['conversations_dropped']:,} dropped "
            f"{conv['dropped'] or ''}, {conv['truncated']:,} truncated at a turn boundary; "
            f"{train['tokens']:,} train tokens, {train['trained_share']:.1%} of them trained (assistant turns)")
    return metrics
