"""Reading sources: files, directories, globs, JSONL, Parquet, dataset directories; bad input errors."""

from __future__ import annotations

import json

import pytest

from cpt_kit.data.sources import ReadOptions, ReplacementCounter, expand_sources, read_documents, source_fingerprint
from cpt_kit.errors import DataError


def read_all(entries, **options):
    counter = ReplacementCounter()
    docs = [doc for source in expand_sources(entries)
            for doc in read_documents(source, ReadOptions(**options), counter)]
    return docs, counter


def test_directory_is_recursive_and_keeps_supported_types(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("unua dokumento", encoding="utf-8")
    (tmp_path / "sub" / "b.md").write_text("dua dokumento", encoding="utf-8")
    (tmp_path / "sub" / "deeper" / "c.jsonl").write_text('{"text": "tria"}\n{"text": "kvara"}\n', encoding="utf-8")
    (tmp_path / "sub" / "skip.csv").write_text("x,y", encoding="utf-8")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "d.txt").write_text("kasxita", encoding="utf-8")
    docs, _ = read_all([str(tmp_path)])
    assert [t for t, _ in docs] == ["unua dokumento", "dua dokumento", "tria", "kvara"]
    assert docs[3][1].endswith("c.jsonl:2")


def test_glob_and_no_match_error(tmp_path):
    for name in ("x1.txt", "x2.txt", "y.txt"):
        (tmp_path / name).write_text(name, encoding="utf-8")
    docs, _ = read_all([str(tmp_path / "x*.txt")])
    assert [t for t, _ in docs] == ["x1.txt", "x2.txt"]
    with pytest.raises(DataError, match=r"'.*nothing\*\.txt' matches no"):
        expand_sources([str(tmp_path / "nothing*.txt")])
    with pytest.raises(DataError, match="no corpus sources"):
        expand_sources([])


def test_non_utf8_strict_names_file_and_byte_offset(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Sa\u0142uton ".encode("utf-8") + b"caf\xe9 bona")
    with pytest.raises(DataError) as info:
        read_all([str(bad)])
    message = info.value.render()
    assert str(bad) in message and "byte offset 12" in message
    assert "data.encoding_errors=replace" in message


def test_non_utf8_replace_mode_counts(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9 kaj \xff\xfe fino")
    docs, counter = read_all([str(bad)], encoding_errors="replace")
    assert docs[0][0] == "caf\ufffd kaj \ufffd\ufffd fino"
    assert counter.count == 3


def test_jsonl_invalid_line_reports_line_number(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "bona"}\n\n{"text": "ankaux bona"}\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"data\.jsonl:4: invalid JSON"):
        read_all([str(path)])


def test_jsonl_missing_field_names_field_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "bona"}\n{"content": "alia kampo"}\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_all([str(path)])
    assert f"{path}:2" in info.value.render() and "'text'" in info.value.render() and "'content'" in info.value.render()
    path.write_text('{"content": "alia kampo"}\n', encoding="utf-8")
    docs, _ = read_all([str(path)], text_field="content")
    assert docs == [("alia kampo", f"{path}:1")]


def test_parquet_rows_and_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "part.parquet"
    pq.write_table(pa.table({"text": ["unu", "du", "tri"], "id": [1, 2, 3]}), path)
    docs, _ = read_all([str(path)])
    assert [t for t, _ in docs] == ["unu", "du", "tri"]
    with pytest.raises(DataError, match="no column 'body'"):
        read_all([str(path)], text_field="body")


def test_saved_dataset_directory(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["a unu", "a du"]}),
                          "test": datasets.Dataset.from_dict({"body": ["testo"]})}).save_to_disk(str(tmp_path / "ds"))
    docs, _ = read_all([str(tmp_path / "ds")], text_field="body")
    assert [t for t, _ in docs] == ["a unu", "a du"]
    docs, _ = read_all([str(tmp_path / "ds")], text_field="body", hf_split="test")
    assert [t for t, _ in docs] == ["testo"]
    with pytest.raises(DataError, match="no split 'validation'"):
        read_all([str(tmp_path / "ds")], text_field="body", hf_split="validation")


def test_hf_prefix_loads_a_local_dataset_dir_with_load_dataset(tmp_path):
    folder = tmp_path / "hub_like"
    (folder / "data").mkdir(parents=True)
    rows = [{"text": f"vico {i}"} for i in range(5)]
    (folder / "data" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    docs, _ = read_all([f"hf:{folder}"], max_documents=3)
    assert [t for t, _ in docs] == ["vico 0", "vico 1", "vico 2"]
    docs, _ = read_all([f"hf:{folder}"], streaming=True)
    assert len(docs) == 5


def test_fingerprint_is_a_content_hash(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("unu", encoding="utf-8")
    [source] = expand_sources([str(path)])
    first = source_fingerprint(source)
    path.write_text("du", encoding="utf-8")
    assert source_fingerprint(source) != first
    assert source_fingerprint(expand_sources(["hf:someone/corpus:eo"])[0]) == {"source": "hf:someone/corpus:eo"}
