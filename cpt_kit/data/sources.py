"""Where documents come from: text files, directories, globs, JSONL, Parquet, datasets.

`expand_sources(["corpus/", "more/*.jsonl", "hf:wikimedia/wikipedia:20231101.eo"])` resolves
each entry into concrete `Source`s (a file, a saved dataset directory, or a `load_dataset`
name); an entry that matches nothing is a `DataError` naming it. `read_documents(source, ...)`
yields `(text, origin)` pairs: text files are cut into documents by `split_by` (text_files.py),
one per JSONL line / Parquet row / dataset row. Everything streams: memory is about one chunk or
row plus `long_document_chars`. `origin` is "file:line" (or "file:row N") so later errors and
stats can point at the input.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from cpt_kit.data.text_files import LongDocuments, ReplacementCounter, Utf8Decoder, cut_long, read_text_documents
from cpt_kit.errors import DataError

TEXT_SUFFIXES = (".txt", ".md")
DATA_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
HF_PREFIX = "hf:"


@dataclass(frozen=True)
class Source:
    kind: str
    """text | jsonl | parquet | saved_dataset | hf"""
    location: str
    """File or directory path, or a `load_dataset` name / local path for kind hf."""
    config: Optional[str] = None
    """Dataset configuration (kind hf only)."""

    def __str__(self) -> str:
        if self.kind == "hf":
            return HF_PREFIX + self.location + (f":{self.config}" if self.config else "")
        return self.location


@dataclass
class ReadOptions:
    split_by: str = "paragraph"
    long_document_chars: int = 100_000
    text_field: str = "text"
    encoding_errors: str = "strict"
    hf_split: str = "train"
    streaming: bool = False
    max_documents: Optional[int] = None


def _file_kind(path: Path) -> Optional[str]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in (".jsonl", ".parquet"):
        return suffix[1:]
    return None


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def expand_sources(entries: tuple[str, ...] | list[str], key: str = "data.sources") -> list[Source]:
    """Resolve recipe entries into concrete sources, in a deterministic order."""
    if not entries:
        raise DataError("no corpus sources are configured", where=key,
                        hint="set data.sources, e.g. --set data.sources=corpus/*.txt")
    sources: list[Source] = []
    for entry in entries:
        found = _expand_one(entry, key)
        if not found:
            raise DataError(f"source {entry!r} matches no .txt/.md/.jsonl/.parquet file or dataset", where=key,
                            hint="check the path (relative paths are relative to the current directory)")
        sources.extend(found)
    return sources


def _expand_one(entry: str, key: str) -> list[Source]:
    if entry.startswith(HF_PREFIX):
        name, _, config = entry[len(HF_PREFIX):].partition(":")
        if not name:
            raise DataError(f"{entry!r} names no dataset", where=key, hint="write hf:NAME or hf:NAME:CONFIG")
        return [Source("hf", name, config or None)]
    path = Path(entry).expanduser()
    if path.is_file():
        kind = _file_kind(path)
        if kind is None:
            raise DataError(f"{entry}: unsupported file type {path.suffix or '(none)'}", where=key,
                            hint="use .txt, .md, .jsonl or .parquet files")
        return [Source(kind, str(path))]
    if path.is_dir():
        if _is_saved_dataset(path):
            return [Source("saved_dataset", str(path))]
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        return [Source(_file_kind(p), str(p)) for p in files]
    matches = sorted(glob.glob(str(path), recursive=True))
    out: list[Source] = []
    for match in matches:
        m = Path(match)
        if m.is_dir():
            out.extend(_expand_one(match, key))
        elif _file_kind(m) is not None:
            out.append(Source(_file_kind(m), match))
    return out


# ----------------------------------------------------------------------------- reading

def read_documents(source: Source, options: ReadOptions, counter: ReplacementCounter,
                   long: LongDocuments | None = None) -> Iterator[tuple[str, str]]:
    """Yield (text, origin) for each document of one source, at most options.max_documents.

    Documents longer than options.long_document_chars come out as several pieces (see
    text_files.cut_long), counted in `long`.
    """
    long = LongDocuments() if long is None else long
    limit = options.max_documents
    n = 0
    if source.kind == "text":
        docs = ((text, f"{source.location}:{line}") for text, line in read_text_documents(
            source.location, options.split_by, options.long_document_chars, options.encoding_errors, long, counter))
    else:
        readers = {"jsonl": _read_jsonl, "parquet": _read_parquet, "saved_dataset": _read_saved_dataset,
                   "hf": _read_hf}
        docs = ((piece, origin) for text, origin in readers[source.kind](source, options, counter)
                for piece in _pieces(text, options.long_document_chars, long))
    for item in docs:
        if limit is not None and n >= limit:
            return
        n += 1
        yield item


def _pieces(text: str, limit: int, long: LongDocuments) -> list[str]:
    if len(text) <= limit:
        return [text]
    long.documents += 1
    return cut_long(text, limit, long)


def _read_jsonl(source: Source, options: ReadOptions, counter: ReplacementCounter) -> Iterator[tuple[str, str]]:
    """One row per line, read line by line (memory: the longest line)."""
    path, field = source.location, options.text_field
    decoder = Utf8Decoder(path, options.encoding_errors, counter)
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = decoder.decode(raw, True)
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"invalid JSON ({exc.msg} at column {exc.colno})", where=where,
                                hint="each line of a .jsonl file must be one JSON object") from None
            if not isinstance(row, dict) or field not in row:
                keys = ", ".join(map(repr, row)) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"no field {field!r} in this row (it has: {keys})", where=where,
                                hint="set data.text_field to the field holding the text")
            yield _as_text(row[field], field, where), where


def _as_text(value, field: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"field {field!r} is a {type(value).__name__}, not text", where=where,
                        hint="data.text_field must name a string field")
    return value


def _read_parquet(source: Source, options: ReadOptions, counter: ReplacementCounter) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    path, field = source.location, options.text_field
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    if field not in names:
        raise DataError(f"no column {field!r} (columns: {', '.join(names)})", where=path,
                        hint="set data.text_field to the column holding the text")
    row = 0
    for batch in parquet.iter_batches(columns=[field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row += 1
            yield _as_text(value, field, f"{path}:row {row}"), f"{path}:row {row}"


def _rows(dataset, source: Source, field: str) -> Iterator[tuple[str, str]]:
    columns = getattr(dataset, "column_names", None)
    if columns is not None and field not in columns:
        raise DataError(f"no column {field!r} (columns: {', '.join(columns)})", where=str(source),
                        hint="set data.text_field to the column holding the text")
    for row, example in enumerate(dataset, start=1):
        if field not in example:
            raise DataError(f"no field {field!r} in row {row} (it has: {', '.join(example)})", where=str(source),
                            hint="set data.text_field to the column holding the text")
        where = f"{source}:row {row}"
        yield _as_text(example[field], field, where), where


def _pick_split(dataset, source: Source, split: str):
    from datasets import DatasetDict, IterableDatasetDict

    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        if split not in dataset:
            raise DataError(f"dataset has no split {split!r} (splits: {', '.join(dataset)})", where=str(source),
                            hint="set data.hf_split")
        return dataset[split]
    return dataset


def _read_saved_dataset(source: Source, options: ReadOptions, counter: ReplacementCounter):
    from datasets import load_from_disk

    dataset = _pick_split(load_from_disk(source.location), source, options.hf_split)
    yield from _rows(dataset, source, options.text_field)


def _read_hf(source: Source, options: ReadOptions, counter: ReplacementCounter):
    from datasets import load_dataset

    try:
        dataset = load_dataset(source.location, source.config, split=options.hf_split, streaming=options.streaming)
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        raise DataError(f"cannot load dataset: {exc}", where=str(source),
                        hint="check the name/config and data.hf_split; hub datasets need network access "
                             "(or a local copy: pass its directory)") from None
    yield from _rows(dataset, source, options.text_field)


# ----------------------------------------------------------------------------- fingerprints

def source_fingerprint(source: Source) -> dict:
    """Content hashes (sha256) of a source's local files; the name for hub datasets."""
    from cpt_kit.manifest import file_sha256

    path = Path(source.location)
    if source.kind == "hf" and not path.exists():
        return {"source": str(source)}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {"source": str(source), "files": {str(p.relative_to(path)): file_sha256(p) for p in files}}
    return {"source": str(source), "sha256": file_sha256(path)}
