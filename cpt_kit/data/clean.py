"""Text cleaning that respects languages and keeps structure.

- Unicode NFC (composed characters: "e" + U+0301 becomes "é"), so the same word always
  tokenizes the same way.
- NUL and other C0/C1 control characters are removed, except newline and tab; CR LF and lone
  CR become LF. Format characters (ZWJ, ZWNJ, soft hyphen...) are kept: scripts need them.
- Whitespace (default): trailing spaces/tabs are removed from every line, runs of blank lines
  become one blank line, blank lines at the start and whitespace at the end of the document
  go. Indentation and runs of spaces inside a line are kept: code, poetry and tables mean
  something by them.
- Whitespace with `collapse_whitespace=True` (data.collapse_whitespace): also runs of spaces
  become one and every line loses its leading spaces/tabs (for prose scraped with ragged
  spacing).
"""

from __future__ import annotations

import re
import unicodedata

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]+")
_SPACES = re.compile(r" {2,}")
_TRAILING = re.compile(r"[ \t]+(?=\n)")
_LINE_EDGES = re.compile(r"[ \t]*\n[ \t]*")
_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str, collapse_whitespace: bool = False) -> str:
    """The cleaned document (may be empty)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii() and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    if _CONTROL.search(text):
        text = _CONTROL.sub("", text)
    if collapse_whitespace:
        if "  " in text:
            text = _SPACES.sub(" ", text)
        return _BLANK_LINES.sub("\n\n", _LINE_EDGES.sub("\n", text)).strip()
    if " \n" in text or "\t\n" in text:
        text = _TRAILING.sub("", text)
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    return text.lstrip("\n").rstrip()


def length_reason(text: str, min_chars: int, max_chars: int | None) -> str | None:
    """Why a cleaned document is dropped for its length, or None if it is kept."""
    if not text:
        return "empty"
    if len(text) < min_chars:
        return "too_short"
    if max_chars is not None and len(text) > max_chars:
        return "too_long"
    return None
