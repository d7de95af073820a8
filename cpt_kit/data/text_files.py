"""Text files read in chunks and cut into documents, in bounded memory.

`read_text_documents(path, split_by, long_chars, ...)` decodes a file 1 MiB at a time (UTF-8,
strict errors name the file, line and byte offset) and yields `(text, line)` for each document:

- `file`: the whole file is one document;
- `paragraph`: documents are separated by blank lines (lines empty or only whitespace);
- `line`: each non-blank line is a document;
- anything else is a regular expression: lines it matches in full (e.g. `%`, `</?doc[^>]*>`)
  separate documents and are not part of them.

Whitespace-only pieces between separators are not documents. A document longer than
`long_chars` characters is cut into pieces of at most `long_chars`, each at the last paragraph
break in the window, else the last line break, else the last space; only text without any
whitespace is cut hard. `LongDocuments` counts the pieces by where they were cut. So a 50 MB
file with no newline never becomes one 50 MB string: memory per file is about one chunk plus
`long_chars`.
"""

from __future__ import annotations

import codecs
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

from cpt_kit.errors import DataError

CHUNK_BYTES = 1 << 20
SPLIT_KEYWORDS = ("file", "paragraph", "line")
CUT_REASONS = ("paragraph", "line", "space", "hard")
_REPLACEMENT = "\ufffd".encode()


@dataclass
class LongDocuments:
    """Documents longer than the limit: how many, and how each extra piece was cut."""

    documents: int = 0
    cuts: Counter = field(default_factory=Counter)

    def stats(self) -> dict:
        return {"documents": self.documents, "pieces_added": sum(self.cuts.values()),
                "cut_at": {reason: self.cuts.get(reason, 0) for reason in CUT_REASONS}}


def separator_pattern(split_by: str) -> Optional[re.Pattern]:
    """The regex whose matches end a document (None for `file`); DataError for a bad regex."""
    if split_by == "file":
        return None
    if split_by == "paragraph":
        return re.compile(r"\n(?:[ \t\r\f\v]*\n)+")
    if split_by == "line":
        return re.compile(r"\n")
    try:
        user = re.compile(split_by)
    except re.error as exc:
        raise DataError(f"{split_by!r} is not a valid regular expression ({exc})", where="data.split_by",
                        hint="use file, paragraph, line, or a regex matching a whole separator line") from None
    if user.fullmatch(""):
        raise DataError(f"{split_by!r} matches an empty line, so every blank line would end a "
                        "document", where="data.split_by", hint="use split_by='paragraph' for blank-line splitting")
    return re.compile(rf"(?:^|\n)(?:{split_by})\r?(?:\n|$)", re.MULTILINE)


def cut_long(text: str, limit: int, long: LongDocuments) -> list[str]:
    """`text` as pieces of at most `limit` characters, cut at the best boundary inside each window."""
    pieces = []
    while len(text) > limit:
        window = text[:limit]
        for reason, sep in (("paragraph", "\n\n"), ("line", "\n"), ("space", " ")):
            at = window.rfind(sep)
            if at > 0:
                cut = at + len(sep)
                break
        else:
            reason, cut = "hard", limit
        pieces.append(text[:cut])
        long.cuts[reason] += 1
        text = text[cut:]
    pieces.append(text)
    return pieces


class ReplacementCounter:
    """Counts U+FFFD substitutions made while decoding in replace mode."""

    def __init__(self) -> None:
        self.count = 0


class Utf8Decoder:
    """Incremental UTF-8 decoding; strict errors name file, line and byte offset."""

    def __init__(self, path: str, errors: str, counter: ReplacementCounter) -> None:
        self.path, self.errors, self.counter = path, errors, counter
        self.pending = b""
        self.offset = 0
        self.lines = 0
        self.first = True

    def decode(self, chunk: bytes, final: bool) -> str:
        data = self.pending + chunk
        if self.first and data.startswith(codecs.BOM_UTF8):
            data, self.offset = data[3:], 3
        self.first = False
        try:
            text, used = codecs.utf_8_decode(data, "strict", final)
        except UnicodeDecodeError as exc:
            if self.errors != "replace":
                line = self.lines + data.count(b"\n", 0, exc.start) + 1
                bad = data[exc.start:exc.start + 4].hex(" ")
                raise DataError(f"not valid UTF-8 at byte offset {self.offset + exc.start} (bytes {bad}: {exc.reason})",
                                where=f"{self.path}:{line}",
                                hint="convert the file to UTF-8, or set data.encoding_errors=replace to substitute "
                                     "U+FFFD for bad bytes") from None
            text, used = codecs.utf_8_decode(data, "replace", final)
            self.counter.count += text.count("\ufffd") - data.count(_REPLACEMENT, 0, used)
        self.pending = data[used:]
        self.offset += used
        self.lines += text.count("\n")
        return text


class _Splitter:
    """Cuts decoded text into documents as it arrives."""

    def __init__(self, split_by: str, long_chars: int, long: LongDocuments) -> None:
        self.separator = separator_pattern(split_by)
        self.keep_blank = split_by == "file"
        self.limit, self.long = long_chars, long
        self.carry, self.line, self.cut_open, self.emitted = "", 1, False, 0

    def _emit(self, text: str, line: int, ends: bool) -> Iterator[tuple[str, int]]:
        pieces = cut_long(text, self.limit, self.long) if len(text) > self.limit else [text]
        if not ends:  # the last piece may still grow
            self.carry = pieces.pop()
        if len(pieces) > 1 or (pieces and not ends) or (ends and self.cut_open):
            self.long.documents += not self.cut_open
            self.cut_open = not ends
        for piece in pieces:
            if piece.strip():
                self.emitted += 1
                yield piece, line
            line += piece.count("\n")
        if not ends:
            self.line = line

    def feed(self, text: str, final: bool) -> Iterator[tuple[str, int]]:
        text = self.carry + text
        self.carry = ""
        # only whole lines are split; a last partial line waits for the next chunk
        end = len(text) if final or self.separator is None else text.rfind("\n") + 1
        pos = 0
        if self.separator is not None:
            for match in self.separator.finditer(text, 0, end):
                yield from self._emit(text[pos:match.start()], self.line, ends=True)
                self.line += text.count("\n", pos, match.end())
                pos = match.end()
        rest = text[pos:]
        if final:
            if rest.strip() or self.cut_open:
                yield from self._emit(rest, self.line, ends=True)
            elif self.keep_blank and not self.emitted:  # a blank file is one (empty) document
                yield rest, self.line
        elif len(rest) > self.limit:  # a long document (or line) so far: emit all but its last piece
            yield from self._emit(rest, self.line, ends=False)
        else:
            self.carry = rest


def read_text_documents(path: str, split_by: str, long_chars: int, errors: str, long: LongDocuments,
                        counter: ReplacementCounter) -> Iterator[tuple[str, int]]:
    """Yield (document, number of its first line) for one text file."""
    splitter = _Splitter(split_by, long_chars, long)
    decoder = Utf8Decoder(path, errors, counter)
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(CHUNK_BYTES)
            yield from splitter.feed(decoder.decode(chunk, not chunk), not chunk)
            if not chunk:
                return
