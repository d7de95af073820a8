"""Write an Ollama Modelfile whose values Ollama's parser reads back unchanged, and parse one back.

`parse` follows Ollama's own parser (parser/parser.go, ParseFile/parseRuneForState/unquote) rune
by rune: a value ends at a newline unless it is inside an open `"..."` or `\"\"\"...\"\"\"`; there is no
escape character; spaces and tabs are kept; other non-printable characters are dropped; the value
is TrimSpace'd and one level of quotes removed. `quote` therefore tries the bare, triple-quoted and
quoted forms and keeps the first one that `parse` reads back exactly; a value none of them can
carry raises ExportError naming the key.
"""

from __future__ import annotations

import contextlib
import unicodedata
from dataclasses import dataclass, field
from typing import Optional

from cpt_kit.errors import ExportError

COMMANDS = ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
            "message", "requires")
_GO_SPACE = " \t\n\v\f\r\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
            "\u2028\u2029\u202f\u205f\u3000"


@dataclass
class Modelfile:
    """The commands of a Modelfile, in order. `parameters` keeps repeats (several `stop`)."""

    from_: str
    template: Optional[str] = None
    system: Optional[str] = None
    adapter: Optional[str] = None
    parameters: list[tuple[str, str]] = field(default_factory=list)

    def params(self, name: str) -> list[str]:
        return [v for k, v in self.parameters if k == name]


def _go_trim(s: str) -> str:
    return s.strip(_GO_SPACE)


def _is_print(ch: str) -> bool:
    """Go's strconv.IsPrint: letters, marks, numbers, punctuation, symbols and ASCII space."""
    return ch == " " or unicodedata.category(ch)[0] in "LMNPS"


def _unquote(s: str) -> tuple[str, bool]:
    if s[:3] == '"""':
        return (s[3:-3], True) if len(s) >= 6 and s[-3:] == '"""' else ("", False)
    if s[:1] == '"':
        return (s[1:-1], True) if len(s) >= 2 and s[-1] == '"' else ("", False)
    return s, True


def parse_commands(text: str) -> list[tuple[str, str]]:
    """(name, value) pairs as Ollama's ParseFile returns them; PARAMETER x gives name x, FROM gives "model"."""
    nil, name, value, param, message, comment = range(6)
    commands: list[tuple[str, str]] = []
    state, buf, cmd, role, line = nil, [], "", "", 1
    if text.startswith("\ufeff"):
        text = text[1:]
    for ch in text:
        if ch in "\r\n":
            line += 1
        # parseRuneForState
        if state == nil:
            nxt, r = (comment, "") if ch == "#" else (nil, "") if ch in " \t\r\n" else (name, ch)
        elif state == name:
            if ch.isascii() and ch.isalpha():
                nxt, r = name, ch
            elif ch in " \t":
                nxt, r = value, ""
            else:
                raise ExportError(f"Modelfile line {line}: invalid command {''.join(buf) + ch!r}")
        elif state == value:
            nxt, r = (nil, ch) if ch in " \t\r\n" else (value, ch)
        elif state in (param, message):
            if (ch.isascii() and (ch.isalnum() or (ch == "_" and state == param))):
                nxt, r = state, ch
            elif ch in " \t":
                nxt, r = value, ""
            else:
                raise ExportError(f"Modelfile line {line}: unexpected {ch!r}")
        else:  # comment
            nxt, r = (nil, "") if ch in "\r\n" else (comment, "")
        if nxt != state:
            word = "".join(buf)
            if state == name:
                if word.lower() not in COMMANDS:
                    raise ExportError(f"Modelfile line {line}: unknown command {word!r}")
                lowered = word.lower()
                if lowered == "from":
                    cmd = "model"
                elif lowered == "parameter":
                    nxt = param
                elif lowered == "message":
                    nxt, cmd = message, lowered
                else:
                    cmd = lowered
            elif state == param:
                cmd = word
            elif state == message:
                role = word
            elif state == value:
                s, ok = _unquote(_go_trim(word))
                if not ok or ch in " \t":
                    buf.append(ch)
                    continue
                commands.append((cmd, f"{role}: {s}" if role else s))
                role = ""
            buf = []
            state = nxt
        if r and _is_print(r):
            buf.append(r)
    if state == value:
        s, ok = _unquote(_go_trim("".join(buf)))
        if not ok:
            raise ExportError("Modelfile ends inside a quoted value (unexpected EOF)")
        commands.append((cmd, f"{role}: {s}" if role else s))
    elif state not in (nil, comment):
        raise ExportError("Modelfile ends in the middle of a command (unexpected EOF)")
    if not any(c == "model" for c, _ in commands):
        raise ExportError("Modelfile has no FROM line")
    return commands


def parse(text: str) -> Modelfile:
    mf = Modelfile(from_="")
    for name, value in parse_commands(text):
        if name == "model":
            mf.from_ = value
        elif name in ("template", "system", "adapter"):
            setattr(mf, name, value)
        elif name not in ("license", "draft", "renderer", "parser", "message", "requires"):
            mf.parameters.append((name, value))
    return mf


def quote(key: str, value: str) -> str:
    """The representation of `value` that Ollama's parser reads back exactly; ExportError if none exists."""
    bad = sorted({c for c in value if not _is_print(c) and c not in "\t\r\n"})
    if bad:
        shown = ", ".join(f"U+{ord(c):04X} ({unicodedata.name(c, 'control')})" for c in bad)
        raise ExportError(f"{key} contains characters Ollama's Modelfile parser drops: {shown}",
                          where=key, hint="remove them (Ollama keeps only printable characters, tabs and newlines)")
    if value == "":
        raise ExportError(f"{key} is empty", where=key, hint="leave it unset instead of an empty string")
    for candidate in (value, f'"""{value}"""', f'"{value}"'):
        with contextlib.suppress(ExportError):  # this quoting does not parse: try the next one
            if parse_commands(f"FROM x\nSYSTEM {candidate}\n")[1:] == [("system", value)]:
                return candidate
    raise ExportError(
        f"{key} cannot be written so that Ollama reads it back unchanged: Ollama's Modelfile has no escape "
        'character, and a line of this value ends in """ (or in " with a leading/trailing quote) which would '
        "close the quoted value early", where=key,
        hint='change the text so that no line ends with """ (e.g. add a character after it), '
             'or avoid a leading and trailing " together')


def render(mf: Modelfile) -> str:
    """Modelfile text. Keys in error messages are the recipe's (export.modelfile.<x>)."""
    lines = [f"FROM {quote('export.modelfile_quant (FROM path)', mf.from_)}"]
    if mf.adapter:
        lines.append(f"ADAPTER {quote('ADAPTER path', mf.adapter)}")
    if mf.template is not None:
        lines.append(f"TEMPLATE {quote('export.modelfile.template', mf.template)}")
    if mf.system:
        lines.append(f"SYSTEM {quote('export.modelfile.system', mf.system)}")
    for name, value in mf.parameters:
        key = "export.modelfile.extra_stops" if name == "stop" else f"export.modelfile.{name}"
        lines.append(f"PARAMETER {name} {quote(key, value)}")
    text = "\n".join(lines) + "\n"
    back = parse(text)
    if (back.from_, back.template, back.system or None, back.adapter, back.parameters) != (
            mf.from_, mf.template, mf.system or None, mf.adapter, mf.parameters):
        raise ExportError("internal: the Modelfile does not parse back to what was written")
    return text
