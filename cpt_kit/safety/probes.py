"""Safety probe sets: prompts in categories, and the rules each category's answers must follow.

A probe set is one JSON file (the shipped ones are in `cpt_kit/safety/probesets/`; a recipe may
point `safety.probe_set` at its own):

    {"name": ..., "languages": ["en", "eo"],
     "rules": {"crisis_help": {"kind": "require_any", "description": ..., "patterns": {"en": [regex...], "eo": [...]}},
               "no_dosage":   {"kind": "forbid_any", ...},
               "no_false_alarm": {"kind": "forbid_any", "patterns_from": "crisis_help"},
               "engages":     {"kind": "min_words", "value": 4}},
     "categories": {"suicidal_explicit": {"description": ..., "risk": true, "rules": ["crisis_help", ...],
                                          "prompts": {"en": [...], "eo": [...]}}, ...}}

Rule kinds: `require_any` (at least one pattern matches the answer), `forbid_any` (none may
match), `min_words`, `prompt_expects` (the answer matches one of the probe's own `expect`
patterns: a prompt may be `{"text": ..., "expect": [regex...]}`, e.g. "paris" for the capital
of France). A `forbid_any` rule may list `negations` per language: a match with one of
those words among the three words before it, in the same sentence, does not count ("it is not
your fault" is no victim-blaming). Patterns are Python regular expressions, matched case-insensitively on the
NFC-normalised answer; for Esperanto the x-system spelling (cx, gx, ...) is read as ĉ, ĝ, ...
Every rule a category uses needs patterns in every language the recipe probes: a rule that
exists only in English would pass or fail an Esperanto answer for the wrong reason.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from cpt_kit.errors import RecipeError

RULE_KINDS = ("require_any", "forbid_any", "min_words", "prompt_expects")
X_SYSTEM = {"cx": "ĉ", "gx": "ĝ", "hx": "ĥ", "jx": "ĵ", "sx": "ŝ", "ux": "ŭ"}


@dataclass(frozen=True)
class Rule:
    name: str
    kind: str
    description: str
    patterns: dict[str, tuple[re.Pattern, ...]]
    value: int = 0
    negations: dict[str, frozenset[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Probe:
    id: str
    category: str
    language: str
    prompt: str
    expect: tuple[re.Pattern, ...] = ()


@dataclass(frozen=True)
class ProbeSet:
    name: str
    source: str
    description: str
    rules: dict[str, Rule]
    categories: dict[str, dict]
    probes: tuple[Probe, ...]


def shipped_probe_sets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("cpt_kit.safety").joinpath("probesets").iterdir()
                  if p.name.endswith(".json"))


def probe_set_path(name_or_path: str) -> Path:
    """A shipped set by name (e.g. "mental_health") or a JSON file path."""
    if name_or_path in shipped_probe_sets():
        return Path(str(resources.files("cpt_kit.safety").joinpath("probesets", f"{name_or_path}.json")))
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise RecipeError(f"probe set {name_or_path!r} is neither a shipped set nor a file", where="safety.probe_set",
                          hint=f"shipped sets: {', '.join(shipped_probe_sets())}; or the path of a JSON probe set")
    return path


def load_probe_set(name_or_path: str, languages: tuple[str, ...], categories: tuple[str, ...] = ()) -> ProbeSet:
    """Load and check a probe set for `languages` (and only `categories`, when given)."""
    path = probe_set_path(name_or_path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RecipeError(f"invalid JSON: {exc.msg}", where=f"{path}:{exc.lineno}") from None
    where = str(path)
    cats = doc.get("categories") or {}
    if not isinstance(cats, dict) or not cats:
        raise RecipeError("the probe set has no categories", where=where)
    unknown = [c for c in categories if c not in cats]
    if unknown:
        raise RecipeError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}",
                          where="safety.categories", hint=f"{path.name} has: {', '.join(cats)}")
    chosen = {name: cats[name] for name in (categories or tuple(cats))}
    offered = doc.get("languages") or []
    missing_lang = [lang for lang in languages if lang not in offered]
    if missing_lang:
        raise RecipeError(f"probe set {doc.get('name', path.stem)!r} has no {', '.join(missing_lang)} probes",
                          where="safety.languages",
                          hint=f"it has {', '.join(offered) or 'none'}; add prompts and rule patterns in that "
                               "language to a copy of the probe set and point safety.probe_set at it")
    raw_rules = doc.get("rules") or {}
    needed = {r for cat in chosen.values() for r in cat.get("rules", ())}
    rules = {name: _rule(name, raw_rules, languages, f"{where} rules.{name}") for name in sorted(needed)}
    probes = []
    for cat_name, cat in chosen.items():
        if not cat.get("rules"):
            raise RecipeError("a category needs at least one rule", where=f"{where} categories.{cat_name}")
        for lang in languages:
            prompts = (cat.get("prompts") or {}).get(lang) or []
            place = f"{where} categories.{cat_name}.prompts.{lang}"
            if not prompts:
                raise RecipeError(f"no {lang} prompts", where=place)
            needs_expect = any(rules[r].kind == "prompt_expects" for r in cat["rules"])
            probes += [_probe(f"{cat_name}/{lang}/{i}", cat_name, lang, p, needs_expect, f"{place}[{i}]")
                       for i, p in enumerate(prompts)]
    return ProbeSet(doc.get("name", path.stem), str(path), doc.get("description", ""), rules, chosen, tuple(probes))


def _probe(probe_id: str, category: str, lang: str, item, needs_expect: bool, where: str) -> Probe:
    text, expect = (item, []) if isinstance(item, str) else \
        (item.get("text"), item.get("expect") or []) if isinstance(item, dict) else (None, [])
    if not isinstance(text, str) or not text.strip():
        raise RecipeError("empty prompt", where=where)
    if needs_expect and not expect:
        raise RecipeError("this category has a prompt_expects rule but the prompt lists no expect patterns", where=where,
                          hint='write it as {"text": ..., "expect": ["regex", ...]}')
    try:
        return Probe(probe_id, category, lang, text, tuple(re.compile(e, re.IGNORECASE) for e in expect))
    except re.error as exc:
        raise RecipeError(f"invalid regular expression {exc.pattern!r}: {exc}", where=where) from None


def _rule(name: str, raw_rules: dict, languages: tuple[str, ...], where: str) -> Rule:
    spec = raw_rules.get(name)
    if not isinstance(spec, dict):
        raise RecipeError(f"rule {name!r} is used by a category but not defined", where=where)
    kind = spec.get("kind")
    if kind not in RULE_KINDS:
        raise RecipeError(f"unknown rule kind {kind!r}", where=where, hint=f"use one of {', '.join(RULE_KINDS)}")
    if kind in ("min_words", "prompt_expects"):
        return Rule(name, kind, spec.get("description", ""), {}, int(spec.get("value", 1)))
    source = spec.get("patterns_from")
    patterns = (raw_rules.get(source) or {}).get("patterns") if source else spec.get("patterns")
    compiled = {}
    for lang in languages:
        texts = (patterns or {}).get(lang)
        if not texts:
            raise RecipeError(f"rule {name!r} has no {lang} patterns", where=where,
                              hint="every rule needs patterns in each language the recipe probes")
        try:
            compiled[lang] = tuple(re.compile(t, re.IGNORECASE) for t in texts)
        except re.error as exc:
            raise RecipeError(f"invalid regular expression {exc.pattern!r}: {exc}", where=f"{where}.patterns.{lang}") from None
    negations = {lang: frozenset(w.lower() for w in words) for lang, words in (spec.get("negations") or {}).items()}
    return Rule(name, kind, spec.get("description", ""), compiled, negations=negations)


def normalise(text: str, language: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\u2019", "'")
    if language == "eo":
        text = re.sub(r"([cghjsu])x", lambda m: X_SYSTEM[m.group(0).lower()].upper() if m.group(1).isupper()
                      else X_SYSTEM[m.group(0).lower()], text, flags=re.IGNORECASE)
    return text


def check_answer(rules: list[Rule], answer: str, language: str, expect: tuple[re.Pattern, ...] = ()) -> list[dict]:
    """One result per rule: {"rule", "passed", "matched"} ("matched": the text that decided it).
    `expect`: the probe's own patterns, for a prompt_expects rule."""
    text = normalise(answer, language)
    results = []
    for rule in rules:
        if rule.kind == "min_words":
            words = len(re.findall(r"\w+", text))
            results.append({"rule": rule.name, "passed": words >= rule.value, "matched": f"{words} words"})
            continue
        if rule.kind == "prompt_expects":
            hit = next((m for p in expect if (m := p.search(text))), None)
            results.append({"rule": rule.name, "passed": hit is not None, "matched": hit.group(0) if hit else None})
            continue
        hit = next((m for p in rule.patterns[language] for m in p.finditer(text)
                    if not _negated(text, m.start(), rule.negations.get(language))), None)
        passed = (hit is not None) if rule.kind == "require_any" else (hit is None)
        results.append({"rule": rule.name, "passed": passed, "matched": hit.group(0) if hit else None})
    return results


def _negated(text: str, start: int, negations: frozenset[str] | None) -> bool:
    """A negation word among the three words before `start`, in the same sentence."""
    if not negations:
        return False
    sentence = re.split(r"[.!?;:\n]", text[:start])[-1]
    return any(w.lower() in negations for w in re.findall(r"[\w']+", sentence)[-3:])
