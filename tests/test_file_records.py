"""Records of run files: whole-file sha256 for small files, size + sampled blocks for big ones."""

from __future__ import annotations

import os

from cpt_kit import file_records
from cpt_kit.file_records import file_record, files_under, problems, records


def test_small_file_record_is_its_sha256_and_detects_any_change(tmp_path):
    import hashlib
    path = tmp_path / "config.json"
    path.write_bytes(b'{"a": 1}')
    assert file_record(path) == {"size": 8, "sha256": hashlib.sha256(b'{"a": 1}').hexdigest()}
    recorded = records(tmp_path, ["config.json"])
    path.write_bytes(b'{"a": 2}')
    assert problems(tmp_path, recorded) == ["config.json was changed after it was written"]


def test_big_file_is_sampled_and_truncation_or_block_changes_are_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(file_records, "FULL_HASH_LIMIT", 64 * 1024)
    monkeypatch.setattr(file_records, "BLOCK", 4096)
    path = tmp_path / "gguf" / "m-Q8_0.gguf"
    path.parent.mkdir()
    data = os.urandom(256 * 1024)
    path.write_bytes(data)
    recorded = records(tmp_path, ["gguf"])
    assert set(recorded["gguf/m-Q8_0.gguf"]) == {"size", "sampled_sha256"}
    assert problems(tmp_path, recorded) == []

    path.write_bytes(data[: len(data) // 2])
    assert problems(tmp_path, recorded) == ["gguf/m-Q8_0.gguf has 131,072 bytes, 262,144 were written"]
    for offset in (0, len(data) // 2, len(data) - 10):  # head, middle and tail blocks
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        path.write_bytes(bytes(changed))
        assert problems(tmp_path, recorded) == ["gguf/m-Q8_0.gguf was changed after it was written"], offset
    path.unlink()
    assert problems(tmp_path, recorded) == ["gguf/m-Q8_0.gguf is missing"]


def test_unfinished_atomic_writes_are_not_part_of_a_record(tmp_path):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "merged" / ".model.safetensors.partial-1234").write_bytes(b"half")
    (tmp_path / ".merged.partial-99").mkdir()
    (tmp_path / ".merged.partial-99" / "config.json").write_bytes(b"{}")
    (tmp_path / "verify.json").write_bytes(b"{}")
    (tmp_path / ".verify.json.tmp-4321-abc_123").write_bytes(b"{")
    assert files_under(tmp_path, ["merged", "verify.json", "nothing"]) == ["merged/model.safetensors", "verify.json"]
