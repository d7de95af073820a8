"""Content records of run files: what a stage wrote (its outputs) and what it read (its inputs).

A record is `{"size": bytes, "sha256": hex}` for files up to FULL_HASH_LIMIT, and
`{"size": bytes, "sampled_sha256": hex}` (sha256 of the size and of a block at the head, the middle
and the tail) for bigger ones: checking a 1B model's multi-GB files then reads a few MiB, and a
truncated, replaced or deleted file is still caught (its size or sampled blocks change).
Paths are relative to the run directory, with "/" separators.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Iterable

FULL_HASH_LIMIT = 64 * 2**20
"""Files up to this size are hashed whole."""
BLOCK = 2**20
"""Bytes read at each sampled position of a bigger file."""
TEMPORARY = re.compile(r"^\..+\.(partial|replaced|tmp)-(?P<pid>\d+)(-[A-Za-z0-9_]+)?$")
"""Names of unfinished atomic writes, each with the pid of the process writing it: `.NAME.partial-PID`
(rundir.atomic_path, atomic_entries), `.NAME.replaced-PID` (an old version being swapped out) and
`.NAME.tmp-PID-XXXXXXXX` (rundir.atomic_write_text). Never part of a record."""

def file_record(path: Path) -> dict:
    """The record of one file."""
    size = os.stat(path).st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= FULL_HASH_LIMIT:
            while block := handle.read(BLOCK):
                digest.update(block)
            return {"size": size, "sha256": digest.hexdigest()}
        digest.update(str(size).encode())
        for offset in (0, size // 2 - BLOCK // 2, size - BLOCK):
            handle.seek(offset)
            digest.update(handle.read(BLOCK))
        return {"size": size, "sampled_sha256": digest.hexdigest()}


def files_under(root: Path, paths: Iterable[str]) -> list[str]:
    """Every file at or below each run-relative path (missing paths give nothing), sorted."""
    found: set[str] = set()
    for rel in paths:
        target = root / rel
        if target.is_file():
            found.add(rel)
        elif target.is_dir():
            for dirpath, dirnames, filenames in os.walk(target):
                dirnames[:] = [d for d in dirnames if not TEMPORARY.match(d)]
                for name in filenames:
                    if not TEMPORARY.match(name):
                        found.add(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


def records(root: Path, paths: Iterable[str]) -> dict[str, dict]:
    """{relative file: record} for every file at or below `paths`."""
    return {rel: file_record(root / rel) for rel in files_under(root, paths)}


def stat_keys(root: Path, paths: Iterable[str]) -> dict[str, tuple]:
    """{relative file: (inode, size, mtime)}: compared before and after a stage to see what it wrote."""
    keys = {}
    for rel in files_under(root, paths):
        stat = os.stat(root / rel)
        keys[rel] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return keys


def problems(root: Path, recorded: dict[str, dict]) -> list[str]:
    """What no longer matches a record: missing files, other sizes, other content (empty: all intact)."""
    found = []
    for rel, want in recorded.items():
        path = root / rel
        if not path.is_file():
            found.append(f"{rel} is missing")
        elif path.stat().st_size != want["size"]:
            found.append(f"{rel} has {path.stat().st_size:,} bytes, {want['size']:,} were written")
        elif file_record(path) != want:
            found.append(f"{rel} was changed after it was written")
    return found
