"""Chat data rows -> validated conversations (lists of {"role", "content"} messages).

Three row layouts, chosen by `sft.format` (or per row with "auto"):
- messages: `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`
- sharegpt: `{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}`
- qa:       `{"question": ..., "answer": ...}` -> one user turn and one assistant turn
Rows are read one at a time from JSONL, Parquet, saved or hub datasets (`cpt_kit.data.sources`),
so a large source is streamed, never held whole. Every problem names the row (file:line, or
`file:row N` / `hf:NAME:row N`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from cpt_kit.data.sources import ReadOptions, Source, _pick_split
from cpt_kit.data.text_files import ReplacementCounter, Utf8Decoder
from cpt_kit.errors import DataError
from cpt_kit.recipe import Sft

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "model": "assistant", "bot": "assistant", "chatgpt": "assistant"}


class ChatDataError(DataError):
    """A conversation that cannot be trained on; `reason` is the key it is counted under when dropped."""

    def __init__(self, message: str, *, reason: str, where: str, hint: Optional[str] = None):
        self.reason = reason
        super().__init__(message, where=where, hint=hint)


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict, ...]
    origin: str
    """file:line (JSONL), file:row N (Parquet, datasets) of the row it came from."""


def read_rows(source: Source, options: ReadOptions) -> Iterator[tuple[dict, str]]:
    """Yield (row, origin) for each row of a chat source, at most options.max_documents."""
    readers = {"jsonl": _jsonl_rows, "parquet": _parquet_rows, "saved_dataset": _dataset_rows, "hf": _dataset_rows}
    if source.kind not in readers:
        raise DataError(f"{source} is a plain-text file; chat data must be .jsonl, .parquet or a dataset",
                        where="data.sources", hint="convert it to JSONL with a messages list per line")
    for n, item in enumerate(readers[source.kind](source, options)):
        if options.max_documents is not None and n >= options.max_documents:
            return
        yield item


def _jsonl_rows(source: Source, options: ReadOptions) -> Iterator[tuple[dict, str]]:
    path = source.location
    decoder = Utf8Decoder(path, options.encoding_errors, ReplacementCounter())
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            line = decoder.decode(raw, True)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"invalid JSON ({exc.msg} at column {exc.colno})", where=where,
                                hint="each line of a .jsonl file must be one JSON object") from None
            if not isinstance(row, dict):
                raise DataError(f"a JSON {type(row).__name__}, not an object", where=where,
                                hint="each line must be an object such as {\"messages\": [...]}")
            yield row, where


def _parquet_rows(source: Source, options: ReadOptions) -> Iterator[tuple[dict, str]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(source.location).iter_batches(batch_size=1024):
        for item in batch.to_pylist():
            row += 1
            yield item, f"{source.location}:row {row}"


def _dataset_rows(source: Source, options: ReadOptions) -> Iterator[tuple[dict, str]]:
    if source.kind == "saved_dataset":
        from datasets import load_from_disk
        dataset = _pick_split(load_from_disk(source.location), source, options.hf_split)
    else:
        from datasets import load_dataset
        try:
            dataset = load_dataset(source.location, source.config, split=options.hf_split,
                                   streaming=options.streaming)
        except (FileNotFoundError, ValueError, ConnectionError) as exc:
            raise DataError(f"cannot load dataset: {exc}", where=str(source),
                            hint="check the name/config and data.hf_split; hub datasets need network access "
                                 "(or a local copy: pass its directory)") from None
    for row, example in enumerate(dataset, start=1):
        yield dict(example), f"{source}:row {row}"


def detect_format(row: dict, spec: Sft, where: str) -> str:
    if spec.format != "auto":
        return spec.format
    if spec.messages_field in row:
        return "messages"
    if spec.conversations_field in row:
        return "sharegpt"
    if spec.question_field in row and spec.answer_field in row:
        return "qa"
    raise ChatDataError(
        f"no chat fields in this row (it has: {', '.join(map(repr, row)) or 'nothing'})", reason="no_chat_fields",
        where=where, hint=f"rows need {spec.messages_field!r} (role/content list), {spec.conversations_field!r} "
                          f"(from/value list) or {spec.question_field!r}+{spec.answer_field!r}; the sft.*_field "
                          "settings rename them")


def _field(row: dict, name: str, key: str, where: str) -> Any:
    if name not in row:
        raise ChatDataError(f"no field {name!r} (it has: {', '.join(map(repr, row))})", reason="missing_field",
                            where=where, hint=f"set {key} to the field that holds it")
    return row[name]


def normalise(row: dict, spec: Sft, where: str) -> list[dict]:
    """The row as a list of {"role", "content"} messages (not yet validated)."""
    layout = detect_format(row, spec, where)
    if layout == "qa":
        question = _field(row, spec.question_field, "sft.question_field", where)
        answer = _field(row, spec.answer_field, "sft.answer_field", where)
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if layout == "messages":
        turns, role_key, text_key, names = _field(row, spec.messages_field, "sft.messages_field", where), \
            "role", "content", None
    else:
        turns, role_key, text_key, names = _field(row, spec.conversations_field, "sft.conversations_field", where), \
            "from", "value", SHAREGPT_ROLES
    if not isinstance(turns, (list, tuple)):
        raise ChatDataError(f"{layout} must be a list of turns, got {type(turns).__name__}", reason="not_a_list",
                            where=where)
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise ChatDataError(f"turn {i} is not an object with {role_key!r} and {text_key!r}: {str(turn)[:80]}",
                                reason="malformed_turn", where=where)
        role = turn[role_key]
        if names is not None:
            role = names.get(str(role).lower(), role)
        messages.append({"role": role, "content": turn[text_key]})
    return messages


def validate(messages: list[dict], where: str) -> None:
    """Roles known, content non-empty text, system only first, user/assistant alternating from a user
    turn, at least one assistant turn."""
    def fail(message: str, reason: str, hint: Optional[str] = None) -> None:
        raise ChatDataError(message, reason=reason, where=where, hint=hint)

    if not messages:
        fail("the conversation has no turns", "no_turns")
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role not in ROLES:
            fail(f"turn {i} has unknown role {role!r}", "unknown_role",
                 f"roles must be {', '.join(ROLES)} (ShareGPT: human, gpt, system)")
        if not isinstance(content, str):
            fail(f"turn {i} ({role}) content is a {type(content).__name__}, not text", "content_not_text")
        if not content.strip():
            fail(f"turn {i} ({role}) has empty content", "empty_content")
        if role == "system" and i > 0:
            fail(f"turn {i} is a system message, but a system message may only come first", "system_not_first")
        if i > 0 and role == messages[i - 1]["role"]:
            fail(f"turns {i - 1} and {i} are both {role}", "same_role_twice",
                 "merge consecutive turns of one speaker into one")
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if "assistant" not in turns:
        fail("the conversation has no assistant turn (nothing to learn)", "no_assistant_turn")
    if turns[0] != "user":
        fail("the first turn after the system message is an assistant turn; a conversation starts with the user",
             "assistant_first")


def conversation(row: dict, spec: Sft, where: str) -> Conversation:
    """Normalise and validate one row; the recipe's system prompt goes first when there is none."""
    messages = normalise(row, spec, where)
    if spec.system_prompt and (not messages or messages[0].get("role") != "system"):
        messages.insert(0, {"role": "system", "content": spec.system_prompt})
    validate(messages, where)
    return Conversation(tuple({"role": m["role"], "content": m["content"]} for m in messages), where)


def canonical(messages: tuple[dict, ...]) -> str:
    """A stable text of a conversation: identity for deduplication and the held-out split."""
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
