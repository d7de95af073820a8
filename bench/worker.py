"""Benchmark worker processes: each measured configuration runs in a fresh Python process (so peak
memory and imported state are its own) that prints one `RESULT {json}` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]


def run_worker(cmd: list[str]) -> Optional[dict]:
    """Run `cmd` with the repository on PYTHONPATH (and Unsloth's torchvision check off) and return the
    JSON of its last `RESULT ` line; None when it failed, after writing the tail of its output to stderr."""
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, UNSLOTH_SKIP_TORCHVISION_CHECK="1", PYTHONPATH=pythonpath)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        sys.stderr.write(f"\nworker failed (exit {proc.returncode}): {' '.join(cmd[:4])} ...\n")
        return None
    return json.loads(lines[-1][len("RESULT "):])
