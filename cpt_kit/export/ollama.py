"""Hand a Modelfile to Ollama: `ollama create` + a short `ollama run` when the binary is on PATH,
otherwise print the exact commands (Ollama cannot be installed everywhere, e.g. in CI)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Callable

from cpt_kit.errors import ExportError

SMOKE_PROMPT = "Hello"
"""What `ollama run` is asked once the model is created (not an eval prompt: editing those must not redo this stage)."""


def ollama_name(name: str) -> str:
    """Ollama model names: lowercase letters, digits, '.', '_' and '-'."""
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.") or "cpt-kit-model"



def commands(modelfile: Path, model_name: str, prompt: str) -> list[list[str]]:
    modelfile = Path(modelfile).resolve()
    return [["ollama", "create", model_name, "-f", str(modelfile)], ["ollama", "run", model_name, prompt]]


def publish(modelfile: Path, model_name: str, prompt: str, log: Callable[[str], None],
            timeout_s: float = 300) -> dict:
    """Create the Ollama model and generate once; without `ollama` on PATH, log the commands instead."""
    cmds = commands(modelfile, model_name, prompt)
    printed = [shlex.join(c) for c in cmds]
    binary = shutil.which("ollama")
    if binary is None:
        log("ollama is not on PATH; to use the model run:\n    " + "\n    ".join(printed))
        return {"ollama": "not_found", "commands": printed}
    results = {}
    for step, cmd in zip(("create", "run"), cmds):
        try:
            done = subprocess.run([binary, *cmd[1:]], capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise ExportError(f"`{shlex.join(cmd)}` did not finish within {timeout_s:.0f} s",
                              where=str(modelfile), hint="is the Ollama server running (`ollama serve`)?") from exc
        if done.returncode != 0:
            raise ExportError(f"`{shlex.join(cmd)}` failed (exit {done.returncode}): {done.stderr.strip()[-800:]}",
                              where=str(modelfile), hint="is the Ollama server running (`ollama serve`)?")
        results[step] = done.stdout.strip()[-400:]
    log(f"ollama model {model_name!r} created; `ollama run {model_name}` answered: {results['run'][:120]!r}")
    return {"ollama": "created", "commands": printed, "sample": results["run"]}
