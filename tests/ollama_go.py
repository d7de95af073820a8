"""Ollama's template rendering and Modelfile parser in real Go, for tests (cpt_kit.export.ollama_render);
skips the calling test when there is no Go toolchain."""

from __future__ import annotations

import pytest

from cpt_kit.export import ollama_render


def _need_go() -> None:
    if not ollama_render.available():
        pytest.skip(ollama_render.NO_GO)


def render(template: str, messages: list[dict], system: str = "") -> str:
    _need_go()
    return ollama_render.render(template, messages, system)


def parse(modelfile_text: str) -> list[tuple[str, str]]:
    _need_go()
    return ollama_render.parse(modelfile_text)
