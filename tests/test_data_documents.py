"""How text files become documents (data.split_by), long documents cut by rule, bounded memory."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from cpt_kit.data import text_files
from cpt_kit.data.sources import ReadOptions, expand_sources, read_documents
from cpt_kit.data.text_files import LongDocuments, ReplacementCounter, cut_long, read_text_documents
from cpt_kit.errors import DataError, RecipeError


def docs_of(path, split_by, long_chars=100_000):
    long = LongDocuments()
    docs = list(read_text_documents(str(path), split_by, long_chars, "strict", long, ReplacementCounter()))
    return docs, long


def test_one_big_file_of_paragraphs_splits_at_blank_lines(target_texts, tmp_path):
    paragraphs = [p.strip() for text in target_texts for p in text.split("\n\n") if p.strip()]
    dump = tmp_path / "eo.txt"
    dump.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    docs, _ = docs_of(dump, "paragraph")
    assert len(paragraphs) > 300 and [d.strip() for d, _ in docs] == paragraphs
    lines = dump.read_text(encoding="utf-8").split("\n")
    assert all(lines[line - 1] == doc.split("\n")[0] for doc, line in docs)  # origin line numbers are right
    assert [d for d, _ in docs_of(dump, "file")[0]] == [dump.read_text(encoding="utf-8")]


def test_blank_lines_with_spaces_and_runs_count_as_one_break(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("\n\nunu\nankoraŭ unu\n \t \n\n\ndu\n\n\n", encoding="utf-8")
    docs, _ = docs_of(path, "paragraph")
    assert [d.strip() for d, _ in docs] == ["unu\nankoraŭ unu", "du"] and [n for _, n in docs] == [3, 8]


def test_line_mode_and_percent_separator(tmp_path):
    path = tmp_path / "fortunes.txt"
    path.write_text("Unua diro.\n  dua linio\n%\nDua diro.\n%\n%\nTria.\n", encoding="utf-8")
    assert [d for d, _ in docs_of(path, "%")[0]] == ["Unua diro.\n  dua linio", "Dua diro.", "Tria.\n"]
    assert [d for d, _ in docs_of(path, "line")[0]] == ["Unua diro.", "  dua linio", "%", "Dua diro.", "%", "%",
                                                        "Tria."]


def test_doc_markers_as_separator_regex(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text('<doc id="1" title="Kato">\nKato\n\nLa kato estas besto.\n</doc>\n'
                    '<doc id="2" title="Hundo">\nHundo\n\nLa hundo bojas.\n</doc>\n', encoding="utf-8")
    docs, _ = docs_of(path, r"</?doc[^>]*>")
    assert [d.strip() for d, _ in docs] == ["Kato\n\nLa kato estas besto.", "Hundo\n\nLa hundo bojas."]
    assert [n for _, n in docs] == [2, 7]


def test_chunk_boundaries_do_not_change_documents(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    text = "".join(f"alineo {i} " + "vorto " * (i % 7) + "\n\n%\n" for i in range(300))
    path.write_text(text, encoding="utf-8")
    whole = {mode: docs_of(path, mode)[0] for mode in ("paragraph", "line", "%", "file")}
    monkeypatch.setattr(text_files, "CHUNK_BYTES", 7)
    for mode, expected in whole.items():
        assert docs_of(path, mode)[0] == expected, mode


def test_cut_long_prefers_paragraph_then_line_then_space_then_hard():
    long = LongDocuments()
    text = "a" * 30 + "\n\n" + "b" * 20 + "\n" + "c" * 10 + " " + "d" * 45
    pieces = cut_long(text, 40, long)
    assert "".join(pieces) == text and all(len(p) <= 40 for p in pieces)
    assert pieces == ["a" * 30 + "\n\n", "b" * 20 + "\n", "c" * 10 + " ", "d" * 40, "d" * 5]
    assert long.stats()["cut_at"] == {"paragraph": 1, "line": 1, "space": 1, "hard": 1}


def test_long_document_in_a_file_is_cut_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(text_files, "CHUNK_BYTES", 1000)
    path = tmp_path / "a.txt"
    body = " ".join(f"vorto{i}" for i in range(3000))  # one paragraph, ~27k characters, no newline
    path.write_text("mallonga\n\n" + body + "\n\nfino\n", encoding="utf-8")
    docs, long = docs_of(path, "paragraph", long_chars=5000)
    texts = [d for d, _ in docs]
    assert texts[0] == "mallonga" and texts[-1].strip() == "fino"
    assert "".join(texts[1:-1]) == body and all(len(t) <= 5000 for t in texts)
    assert long.stats() == {"documents": 1, "pieces_added": len(texts) - 3,
                            "cut_at": {"paragraph": 0, "line": 0, "space": len(texts) - 3, "hard": 0}}


def test_50_mb_without_newline_streams_in_bounded_memory(tmp_path):
    path = tmp_path / "huge.txt"
    word = ("ĉiutage " * 16).encode()
    with open(path, "wb") as handle:
        for _ in range(50_000_000 // len(word)):
            handle.write(word)
    tracemalloc.start()
    try:
        count = total = 0
        for doc, _ in read_text_documents(str(path), "paragraph", 100_000, "strict", LongDocuments(),
                                          ReplacementCounter()):
            count += 1
            total += len(doc)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == len(word.decode()) * (50_000_000 // len(word)) and count > 400
    assert peak < 16_000_000, f"peak {peak / 1e6:.1f} MB while reading a 50 MB line"


def test_jsonl_long_row_is_cut_and_rows_stream(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"text": "mallonga"}, {"text": "x " * 4000}, {"text": "lasta"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    long = LongDocuments()
    [source] = expand_sources([str(path)])
    docs = list(read_documents(source, ReadOptions(long_document_chars=3000), ReplacementCounter(), long))
    assert [o for _, o in docs] == [f"{path}:1"] + [f"{path}:2"] * 3 + [f"{path}:3"]
    assert "".join(d for d, _ in docs[1:4]) == rows[1]["text"] and long.documents == 1


def test_bad_utf8_deep_in_a_file_names_line_and_byte_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(text_files, "CHUNK_BYTES", 64)
    path = tmp_path / "a.txt"
    good = "".join(f"linio {i} ĉ\n" for i in range(40)).encode()
    path.write_bytes(good + b"malbona \xff bajto\n")
    with pytest.raises(DataError) as info:
        docs_of(path, "line")
    message = info.value.render()
    assert f"{path}:41:" in message and f"byte offset {len(good) + 8}" in message


def test_replace_mode_counts_each_bad_sequence_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(text_files, "CHUNK_BYTES", 5)
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffbona \ufffd ".encode() + b"caf\xe9 \xff\xfe fino \xe2\x82")
    counter = ReplacementCounter()
    [(doc, _)] = list(read_text_documents(str(path), "file", 1000, "replace", LongDocuments(), counter))
    assert doc == "bona \ufffd caf\ufffd \ufffd\ufffd fino \ufffd" and counter.count == 4  # the real U+FFFD not counted


@pytest.mark.parametrize("split_by, message", [("(unclosed", "not a valid regular expression"),
                                               (r"\s*", "matches an empty line")])
def test_bad_split_by_is_a_recipe_error(split_by, message):
    from cpt_kit.recipe import Data, Model, Recipe
    from cpt_kit.recipe.validate import validate_recipe

    with pytest.raises(RecipeError, match=message) as info:
        validate_recipe(Recipe(name="x", model=Model(base="some/model"), data=Data(sources=("a",), split_by=split_by)))
    assert info.value.where == "data.split_by"


@pytest.mark.parametrize("collapse, expected", [(False, "def f():\n    return  1"), (True, "def f():\nreturn 1")])
def test_cleaning_option_reaches_the_document_stream(collapse, expected, tmp_path):
    from cpt_kit.data.corpus import Cleaning, CorpusStats, clean_documents

    path = tmp_path / "code.txt"
    path.write_text("def f():   \n    return  1\n\n\n\nmallonga\n", encoding="utf-8")
    cleaning = Cleaning(collapse_whitespace=collapse, min_chars=10, max_chars=None, dedup_exact=True,
                        dedup_near=True, near_dup_threshold=0.85)
    stats = CorpusStats()
    docs = list(clean_documents(expand_sources([str(path)]), ReadOptions(), cleaning, stats))
    assert docs == [(expected, f"{path}:1")]
    assert stats.stats()["per_source"] == {str(path): {"read": 2, "kept": 1}} and stats.dropped["too_short"] == 1
