"""`runs/<name>/manifest.json`: resolved recipe, library versions, input hashes, per-stage status."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from cpt_kit.errors import CptKitError
from cpt_kit.rundir import atomic_write_json

LIBRARIES = ("cpt-kit", "torch", "transformers", "peft", "trl", "datasets", "unsloth", "unsloth_zoo",
             "bitsandbytes", "llama-cpp-python", "gguf", "sentencepiece", "datasketch")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class Manifest:
    """Read-modify-write view of manifest.json; every change is saved atomically at once."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = Path(path)
        self.data = data

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        """The manifest at `path` ({} when there is none); one that cannot be read is an error, never replaced."""
        path = Path(path)
        data: Any = {}
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CptKitError(f"the run's manifest cannot be read ({exc})", where=str(path),
                                  hint="cpt-kit keeps no copy of it: if you edited it, fix the JSON at the "
                                       "position named above; else put back a copy you have (the file is "
                                       f"small), or move the run directory {path.parent} aside and start a new "
                                       "run (cpt-kit never replaces an unreadable manifest)") from None
            if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
                raise CptKitError("the run's manifest is not a cpt-kit manifest (a JSON object with \"stages\")",
                                  where=str(path), hint=f"move the run directory {path.parent} aside and start a new run")
        data.setdefault("stages", {})
        return cls(path, data)

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].get(name, {})

    def start(self, name: str, fp: str, basis: dict[str, Any]) -> None:
        """Mark `name` running with its fingerprint and basis; the outputs its last finished run
        recorded are kept until it finishes again."""
        previous = self.stage(name)
        unfinished = previous.get("status") in ("running", "failed")
        entry = {"status": "running", "fingerprint": fp, "started": _now(), "attempts": previous.get("attempts", 0) + 1,
                 "basis": basis,
                 "unfinished_since": previous.get("unfinished_since", time.time()) if unfinished else time.time()}
        if "outputs" in previous:
            entry["outputs"] = previous["outputs"]
        self.data["stages"][name] = entry
        self.save()

    def finish(self, name: str, metrics: dict[str, Any], seconds: float, outputs: dict[str, dict]) -> None:
        entry = self.data["stages"][name]
        entry.update(status="done", finished=_now(), seconds=round(seconds, 2), metrics=metrics, outputs=outputs)
        entry.pop("unfinished_since", None)
        entry.pop("error", None)
        self.save()

    def fail(self, name: str, error: str, seconds: float) -> None:
        entry = self.data["stages"].setdefault(name, {})
        entry.update(status="failed", finished=_now(), seconds=round(seconds, 2), error=error)
        self.save()

    def metrics(self, name: str) -> dict[str, Any]:
        return self.stage(name).get("metrics", {})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
