"""Colab's `google.colab.files` without a browser: `upload()` returns the files of the folder named by
FAKE_COLAB_UPLOAD as if the user had picked them, and saves each in the working directory as Colab does; `download(path)` appends the path to the file named
by FAKE_COLAB_DOWNLOADS instead of sending it to the browser."""

from __future__ import annotations

import os
from pathlib import Path


def _env_path(name: str) -> Path:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"the fake google.colab.files needs the environment variable {name} "
                           "(set by tests/test_notebooks.py)")
    return Path(value)


def upload() -> dict[str, bytes]:
    """{file name: contents}, like Colab's upload dialog returns; each file is also written to the
    working directory, as Colab's upload() does."""
    picked = {p.name: p.read_bytes() for p in sorted(_env_path("FAKE_COLAB_UPLOAD").iterdir()) if p.is_file()}
    for name, data in picked.items():
        Path(name).write_bytes(data)
    return picked


def download(filename: str) -> None:
    with _env_path("FAKE_COLAB_DOWNLOADS").open("a", encoding="utf-8") as log:
        log.write(f"{filename}\n")
