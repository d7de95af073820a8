"""One run per run directory: a second run fails at once naming the first; a dead run's lock is taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from cpt_kit.errors import CptKitError
from cpt_kit.run_lock import LOCK_NAME, run_lock

HOLD = textwrap.dedent("""\
    import sys, time
    from pathlib import Path
    from cpt_kit.run_lock import run_lock
    with run_lock(Path(sys.argv[1]), log=lambda text: None):
        print("locked", flush=True)
        time.sleep(60)
""")


def _holder(root):
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert process.stdout.readline().strip() == "locked"
    return process


def test_second_run_fails_at_once_naming_the_pid(tmp_path):
    holder = _holder(tmp_path / "run")
    try:
        with pytest.raises(CptKitError) as info:
            with run_lock(tmp_path / "run"):
                pytest.fail("a second holder got the lock")
        text = info.value.render()
        assert f"pid {holder.pid}" in text and "another cpt-kit run" in text and f"kill {holder.pid}" in text
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_run_is_taken_over_with_a_note(tmp_path):
    holder = _holder(tmp_path / "run")
    holder.kill()  # SIGKILL: no cleanup, the lock file stays with its pid
    holder.wait()
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == holder.pid
    notes = []
    with run_lock(tmp_path / "run", log=notes.append):
        assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == os.getpid()
        with run_lock(tmp_path / "run"):  # the same process again (export --adapter, then the pipeline)
            pass
    assert len(notes) == 1 and f"pid {holder.pid}" in notes[0] and "no longer running" in notes[0]
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_two_cli_runs_on_one_directory(tmp_path, monkeypatch):
    """The pipeline holds the lock for the whole run: a second `run_pipeline` fails before any stage."""
    from stage_helpers import quiet_console

    from cpt_kit import pipeline
    from cpt_kit.recipe import Model, Recipe
    from cpt_kit.rundir import RunDir

    holder = _holder(tmp_path / "run")
    try:
        with pytest.raises(CptKitError, match=f"pid {holder.pid}"):
            pipeline.run_pipeline(Recipe(name="t", model=Model(base="m")), RunDir(tmp_path / "run"), quiet_console())
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
