"""Cleaning and deduplication (pure functions, no tokenizer)."""

from __future__ import annotations

import random

from cpt_kit.data.clean import clean_text, length_reason
from cpt_kit.data.dedup import ExactDeduper, NearDeduper, shingles


def test_nfc_composes_characters():
    decomposed = "Mia kafe\u0301jo"  # e + combining acute
    assert clean_text(decomposed) == "Mia kaf\u00e9jo"
    assert clean_text("c\u0302u") == "\u0109u"  # Esperanto ĉ


def test_control_characters_removed_newline_and_tab_kept():
    text = "a\x00b\x07c\x1bd\x7fe\x85f\tg\nh"
    assert clean_text(text) == "abcdef\tg\nh"


def test_format_characters_kept():
    assert clean_text("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645") == "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"


def test_collapse_whitespace_option_normalises_every_space():
    text = "  First   line  \r\nsecond\tline\t\r\n\r\n\r\n\n\n   Third    paragraph.   \n\n"
    assert clean_text(text, collapse_whitespace=True) == "First line\nsecond\tline\n\nThird paragraph."


def test_default_cleaning_keeps_indentation_and_inner_spaces():
    code = "\n  \ndef f(x):   \n    if x:\t\n        return [1,  2]\n\n\n\n    return None  \n\n"
    assert clean_text(code) == "def f(x):\n    if x:\n        return [1,  2]\n\n    return None"
    poem = "   La vento blovas,\n      la folioj falas;\n   kaj mi restas."
    assert clean_text(poem) == poem  # the first line's indentation too
    table = "| nomo  | jaroj |\n|-------|-------|\n| Ana   |    12 |"
    assert clean_text(table) == table
    assert clean_text("a\r\n  b\r  c") == "a\n  b\n  c"


def test_length_reasons():
    assert length_reason("", 5, None) == "empty"
    assert length_reason("abc", 5, None) == "too_short"
    assert length_reason("abcdefgh", 5, 6) == "too_long"
    assert length_reason("abcdef", 5, 6) is None


def test_exact_dedup():
    dedup = ExactDeduper()
    assert not dedup.is_duplicate("La kato dormas.")
    assert dedup.is_duplicate("La kato dormas.")
    assert not dedup.is_duplicate("La hundo dormas.")


def _words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"vorto{i}" for i in range(400)]
    return [rng.choice(vocab) for _ in range(n)]


def test_near_dedup_catches_small_edit_not_different_text():
    words = _words(300, 1)
    near = NearDeduper(threshold=0.8)
    assert not near.is_duplicate(" ".join(words))
    edited = list(words)
    edited[150] = "alia"
    assert near.is_duplicate(" ".join(edited))
    assert not near.is_duplicate(" ".join(_words(300, 2)))


def test_short_documents_use_character_shingles():
    assert all(len(s) == 5 for s in shingles("La kato dormas bone."))
    assert all(len(s.split()) == 5 for s in shingles(" ".join(_words(40, 3))))
    near = NearDeduper(threshold=0.7)
    assert not near.is_duplicate("La granda kato dormas sur la tapi\u0109o.")
    assert near.is_duplicate("La granda kato dormas sur la tapi\u0109o!")


def test_signature_estimates_jaccard_of_shingle_sets():
    import numpy as np

    near = NearDeduper(threshold=0.85)
    base = _words(600, 7)
    for changed in (30, 120, 300):
        edited = list(base)
        for i in range(0, 600, 600 // changed):
            edited[i] = "alia"
        a, b = set(shingles(" ".join(base))), set(shingles(" ".join(edited)))
        true = len(a & b) / len(a | b)
        estimate = float(np.mean(near.signature(" ".join(base)) == near.signature(" ".join(edited))))
        assert abs(estimate - true) < 0.15, (changed, true, estimate)


def test_dedup_indexes_grow_and_still_find_earlier_documents(monkeypatch):
    from cpt_kit.data import dedup

    monkeypatch.setattr(dedup, "MERGE_EVERY", 16)
    monkeypatch.setattr(dedup, "SIGNATURE_BLOCK", 16)
    exact, near = ExactDeduper(), NearDeduper(threshold=0.8)
    docs = [" ".join(_words(60, 100 + i)) for i in range(80)]
    assert not any(exact.is_duplicate(d) or near.is_duplicate(d) for d in docs)
    assert len(exact._seen.keys) >= 64 and len(near._buckets.keys) >= 64  # merged into the sorted arrays
    assert len(near._signatures) == 5  # 80 signatures in blocks of 16
    assert all(exact.is_duplicate(d) for d in docs)
    assert all(near.is_duplicate(d.replace(" ", "  ", 1) + " fino") for d in docs[::7])
