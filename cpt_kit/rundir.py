"""The run directory: where each stage's outputs live, and writes that never leave half a file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator


@dataclass(frozen=True)
class RunDir:
    """Paths of one run, `runs/<name>/` by default. Stages read and write only through these."""

    root: Path

    def __post_init__(self) -> None:
        # absolute, so paths stay valid for subprocesses (the GGUF converter) that run elsewhere
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def gguf(self) -> Path:
        return self.root / "gguf"

    @property
    def ollama(self) -> Path:
        return self.root / "ollama"

    @property
    def verify(self) -> Path:
        return self.root / "verify.json"

    @property
    def safety(self) -> Path:
        return self.root / "safety.json"

    @property
    def tokenizer(self) -> Path:
        """The tokenizer the model is trained with (differs from the base's when the vocabulary was extended)."""
        return self.data / "tokenizer"


def refuse_foreign_dir(run: RunDir) -> None:
    """A directory that exists, holds anything and is not a cpt-kit run is never written into."""
    from cpt_kit.errors import CptKitError
    from cpt_kit.run_lock import LOCK_NAME

    root = run.root
    if root.exists() and not root.is_dir():
        raise CptKitError(f"{root} is a file, not a run directory", where=str(root), hint="choose another --output-dir")
    if root.is_dir() and not run.manifest.exists() and any(p.name != LOCK_NAME for p in root.iterdir()):
        raise CptKitError(f"{root} exists, is not empty and is not a cpt-kit run (no manifest.json)", where=str(root),
                          hint="choose a new or empty --output-dir: cpt-kit never writes into a directory "
                               "it did not create, whatever the flags")


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to a temporary file next to `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the pid in the name: remove_stale_partials removes it only once this process is gone
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # the mode open() would give (mkstemp makes 0600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process's umask, read without changing it (os.umask can only be read by setting it, which
    would change the mode of files other threads create meanwhile)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path (file or directory) beside `final`; rename it into place on success.

    On an exception the temporary path is removed and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp} for {final}")
        _replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_entries(final_dir: Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on success rename each entry written there into
    `final_dir`, replacing entries of the same name and leaving the others (e.g. a user's) as they are."""
    final_dir = Path(final_dir)
    tmp = final_dir.parent / f".{final_dir.name}.partial-{os.getpid()}"
    _remove(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        final_dir.mkdir(exist_ok=True)
        for entry in sorted(tmp.iterdir()):
            _replace(entry, final_dir / entry.name)
    finally:
        _remove(tmp)


def _replace(new: Path, final: Path) -> None:
    """Rename `new` to `final`; an existing `final` is renamed aside first and removed after."""
    aside = final.parent / f".{final.name}.replaced-{os.getpid()}"
    if final.exists() or final.is_symlink():
        _remove(aside)
        os.replace(final, aside)
    os.replace(new, final)
    _remove(aside)


def remove_stale_partials(root: Path) -> list[str]:
    """Remove unfinished atomic writes left in the run by processes that are gone; returns their paths.
    Only cpt-kit's own temporary names match (file_records.TEMPORARY: they carry the writer's pid)."""
    from cpt_kit.file_records import TEMPORARY

    removed = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            match = TEMPORARY.match(name)
            if match and not _alive(match.group("pid")):
                _remove(Path(dirpath, name))
                removed.append(str(Path(dirpath, name).relative_to(root)))
        dirnames[:] = [d for d in dirnames if not TEMPORARY.match(d)]
    return sorted(removed)


def _alive(pid: str | None) -> bool:
    if not pid or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
