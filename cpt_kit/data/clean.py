"""Text cleaning that respects languages: Unicode NFC, control characters, whitespace.

- Unicode NFC (composed characters: "e" + U+0301 becomes "é"), so the same word always
  tokenizes the same way.
- NUL and other C0/C1 control characters are removed, except newline and tab; CR LF and lone
  CR become LF. Format characters (ZWJ, ZWNJ, soft hyphen...) are kept: scripts need them.
- Whitespace: runs of spaces collapse to one, lines are trimmed, at most one blank line
  separates paragraphs, the document is stripped.
"""

from __future__ import annotations

import re
import unicodedata

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]+")
_SPACES = re.compile(r" {2,}")
_LINE_EDGES = re.compile(r"[ \t]*\n[ \t]*")
_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """The cleaned document (may be empty)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    if _CONTROL.search(text):
        text = _CONTROL.sub("", text)
    if "  " in text:
        text = _SPACES.sub(" ", text)
    text = _LINE_EDGES.sub("\n", text)
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def length_reason(text: str, min_chars: int, max_chars: int | None) -> str | None:
    """Why a cleaned document is dropped for its length, or None if it is kept."""
    if not text:
        return "empty"
    if len(text) < min_chars:
        return "too_short"
    if max_chars is not None and len(text) > max_chars:
        return "too_long"
    return None
