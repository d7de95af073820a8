"""One run at a time per run directory: an exclusive lock on `<run>/run.lock` for the whole run.

The lock is an `fcntl.flock` on the file, so the kernel releases it when the process ends, however
it ends; the file holds the holder's pid, host, start time and command for the message the next
run shows. A lock file left by a process that is gone is taken over, with a note saying so.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from cpt_kit.errors import CptKitError

LOCK_NAME = "run.lock"
_held: dict[Path, int] = {}
"""Run directories this process holds (re-entrant: `cpt-kit export --adapter` locks before the pipeline does)."""


class RunDirectoryBusy(CptKitError):
    """Another process holds the run directory's lock (nothing of this run happened)."""


def _read(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        holder = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}"
            + (f" ({holder['command']})" if holder.get("command") else ""))


def _acquire(path: Path) -> tuple[int, dict[str, Any]]:
    """(open locked descriptor, what the file said before) or CptKitError when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise RunDirectoryBusy(f"another cpt-kit run is using this run directory: {_describe(holder)}",
                              where=str(path.parent),
                              hint=f"wait for it to finish, or stop it (kill {holder.get('pid', 'PID')}); "
                                   "or use another --output-dir") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file the previous holder unlinked while we opened it
            return fd, _read(fd)
        os.close(fd)


@contextlib.contextmanager
def run_lock(root: Path, log=print) -> Iterator[None]:
    """Hold the lock of run directory `root` (created if missing) until the block ends."""
    root = Path(root).resolve()
    if root in _held:
        _held[root] += 1
        try:
            yield
        finally:
            _held[root] -= 1
        return
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    fd, previous = _acquire(path)
    if previous.get("pid"):
        log(f"note: taking over the lock of a run that is no longer running ({_describe(previous)})")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(me) + "\n").encode())
    os.fsync(fd)
    _held[root] = 1
    try:
        yield
    finally:
        del _held[root]
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)
