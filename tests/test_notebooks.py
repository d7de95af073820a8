"""The Colab notebooks run headless on CPU with the offline demo recipe (papermill overrides their
parameters cell; tests/fake_colab stands in for Colab's file upload and download): a notebook that
breaks fails the tests. Outputs are stripped in the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "examples" / "colab"
FAKE_COLAB = Path(__file__).resolve().parent / "fake_colab"
FAST = ["train.max_steps=30", "export.quantizations=Q8_0"]
BOOKS = ["domain.ipynb", "language.ipynb", "mental_health.ipynb"]
# cells every notebook has, found by a line of their code; they must be the same in all three
SHARED = {"checkout": '"git", "clone"', "install": '"pip", "install"', "helpers": "def cpt_kit(",
          "upload": "colab_files.upload()", "plan": 'cpt_kit("plan"', "run": 'cpt_kit("run"',
          "report": "report.md", "download": "colab_files.download", "ollama": "ollama create"}


def _code_cells(name: str) -> list[dict]:
    return [c for c in json.loads((NOTEBOOKS / name).read_text())["cells"] if c["cell_type"] == "code"]


def _cell(name: str, marker: str) -> dict:
    found = [c for c in _code_cells(name) if marker in c["source"]]
    assert len(found) == 1, (name, marker, len(found))
    return found[0]


def test_notebooks_are_stripped_and_parameterised():
    assert sorted(b.name for b in NOTEBOOKS.glob("*.ipynb")) == BOOKS
    for book in BOOKS:
        code = _code_cells(book)
        assert all(not c["outputs"] and c["execution_count"] is None for c in code), f"{book} has outputs"
        assert sum("parameters" in c["metadata"].get("tags", []) for c in code) == 1, book
        assert "INSTALL" in code[0]["source"]
        for marker in SHARED.values():
            assert _cell(book, marker)["source"] == _cell(BOOKS[0], marker)["source"], (book, marker)


def _partial(name: str, tmp_path: Path, *markers: str) -> Path:
    """The notebook cut down to its parameters cell and the code cells with these markers, in its order."""
    nb = json.loads((NOTEBOOKS / name).read_text())
    nb["cells"] = [c for c in nb["cells"] if c["cell_type"] == "code" and
                   ("parameters" in c["metadata"].get("tags", []) or any(m in c["source"] for m in markers))]
    path = tmp_path / f"partial-{name}"
    path.write_text(json.dumps(nb))
    return path


def _execute(book: Path, tmp_path: Path, cwd: Path = REPO, **parameters) -> dict:
    import papermill

    out = tmp_path / f"out-{book.name}"
    try:
        papermill.execute_notebook(str(book), str(out), parameters=parameters, cwd=str(cwd),
                                   kernel_name="python3", progress_bar=False, log_output=False)
    finally:
        executed = json.loads(out.read_text()) if out.is_file() else None
    return executed


def _printed(nb: dict) -> str:
    return "\n".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"])


def _failure(book: Path, tmp_path: Path, **parameters) -> tuple[str, dict]:
    """(what the notebook printed before the cell that raised, then that cell's error; the executed notebook)."""
    import papermill

    with pytest.raises(papermill.PapermillExecutionError) as caught:
        _execute(book, tmp_path, **parameters)
    executed = json.loads((tmp_path / f"out-{book.name}").read_text())
    return f"{_printed(executed)}\n{caught.value.ename}: {caught.value.evalue}", executed


def test_checkout_cell_clones_once_and_reuses_the_checkout(tmp_path):
    """First run clones; rerun inside the checkout does nothing; after a runtime restart (a new kernel in
    the parent folder again) it goes back into the existing checkout instead of cloning into it."""
    origin = tmp_path / "origin"
    (origin / "recipes").mkdir(parents=True)
    (origin / "recipes" / "demo.py").write_text("RECIPE = None\n")
    git = ["git", "-C", str(origin), "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "recipes"]):
        subprocess.run(git + args, check=True)
    content = tmp_path / "content"
    content.mkdir()
    book = _partial("language.ipynb", tmp_path, SHARED["checkout"])
    nb = json.loads(book.read_text())
    nb["cells"].append({**nb["cells"][-1], "id": "checkout-again"})  # the cell run twice in one kernel
    book.write_text(json.dumps(nb))
    first = _printed(_execute(book, tmp_path, cwd=content, INSTALL=True, CPT_KIT_REPO=f"file://{origin}"))
    assert first.count(f"cpt-kit checkout: {content / 'cpt-kit'}") == 2
    assert (content / "cpt-kit" / "recipes" / "demo.py").is_file()
    again = _printed(_execute(book, tmp_path, cwd=content, INSTALL=True, CPT_KIT_REPO=f"file://{tmp_path / 'gone'}"))
    assert again.count(f"cpt-kit checkout: {content / 'cpt-kit'}") == 2


def test_plan_cell_tells_does_not_fit_from_an_error(tmp_path):
    """`cpt-kit plan` exits 3 for "does not fit" (the advice is printed, the notebook goes on); any other
    non-zero exit is an error that stops the notebook."""
    book = _partial("language.ipynb", tmp_path, SHARED["checkout"], SHARED["helpers"], SHARED["plan"])
    common = dict(INSTALL=False, PLAN_GPU="t4", OUTPUT_DIR=str(tmp_path / "run"))
    failed, _ = _failure(book, tmp_path, RECIPE="recipes/no_such_recipe.py", OVERRIDES=[], **common)
    assert "cpt-kit plan failed (exit 2)" in failed and "no_such_recipe.py" in failed
    assert "does NOT fit" not in failed
    too_big = ["train.per_device_train_batch_size=4096", "model.max_seq_length=8192"]
    printed = _printed(_execute(book, tmp_path, RECIPE="recipes/demo.py", OVERRIDES=too_big, **common))
    assert "does NOT fit a t4" in printed and "fits with --set train.per_device_train_batch_size=" in printed


def test_sft_notebook_stops_at_once_without_the_language_run(tmp_path):
    book = _partial("mental_health.ipynb", tmp_path, SHARED["checkout"], "BASE_RUN:", SHARED["install"])
    failed, executed = _failure(book, tmp_path, BASE_RUN=str(tmp_path / "drive" / "language"), INSTALL=False)
    assert f"no trained language model at {tmp_path / 'drive' / 'language'}" in failed and "SAVE_MODEL_TO" in failed
    install = next(c for c in executed["cells"] if SHARED["install"] in "".join(c["source"]))
    assert install["execution_count"] is None and not install["outputs"]  # stopped before the install


@pytest.mark.slow
def test_notebooks_run_headless(tmp_path, monkeypatch):
    # the user "uploads" 40 of the shipped Esperanto texts through the fake Colab dialog
    picked = tmp_path / "picked"
    picked.mkdir()
    for text in sorted((REPO / "examples" / "data" / "esperanto").glob("*.txt"))[:40]:
        shutil.copy(text, picked)
    downloads = tmp_path / "downloads.txt"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKE_COLAB), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("FAKE_COLAB_UPLOAD", str(picked))
    monkeypatch.setenv("FAKE_COLAB_DOWNLOADS", str(downloads))
    run, corpus, drive = tmp_path / "language-run", tmp_path / "content" / "corpus", tmp_path / "drive" / "language"
    common = dict(RECIPE="recipes/demo.py", OUTPUT_DIR=str(run), INSTALL=False, UPLOAD_CORPUS=True,
                  UPLOAD_DIR=str(corpus), PLAN_GPU="cpu")
    try:
        language = _printed(_execute(NOTEBOOKS / "language.ipynb", tmp_path, OVERRIDES=FAST, SAVE_MODEL_TO=str(drive),
                                     **common))
    finally:  # Colab (and the fake) save uploads in the working directory, the checkout: the notebook moves them
        left = [REPO / p.name for p in picked.iterdir() if (REPO / p.name).exists()]
        for path in left:
            path.unlink()
    assert not left, f"uploaded files left in the checkout: {left[:3]}"
    assert "fits" in language and "ollama create demo -f Modelfile" in language
    assert (run / "report.md").is_file() and list((run / "report").glob("*.png"))
    # the run trained on the uploaded files, not on the recipe's own corpus
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["recipe"]["data"]["sources"] == [str(corpus)] and manifest["stages"]["train"]["status"] == "done"
    documents = json.loads((run / "data" / "stats.json").read_text())["corpus"]["documents"]
    assert sorted(Path(s).name for s in documents["per_source"]) == sorted(p.name for p in picked.iterdir())
    assert documents["read"] == 40
    # Colab's download was offered the GGUF and the Modelfile
    offered = sorted(Path(p).name for p in downloads.read_text().splitlines())
    assert offered == sorted([p.name for p in (run / "gguf").glob("*.gguf")] + ["Modelfile"])
    # the domain notebook (upload on by default) on the same run and upload: finished stages are skipped
    domain = _printed(_execute(NOTEBOOKS / "domain.ipynb", tmp_path, OVERRIDES=FAST, **common))
    assert "skipped" in domain or "done already" in domain
    # the SFT notebook from the copy language.ipynb saved to "Drive" (the seeds' flow), through the merge
    assert sorted(p.name for p in drive.iterdir()) == ["manifest.json", "merged"]
    chat = tmp_path / "chat-run"
    sft = _printed(_execute(NOTEBOOKS / "mental_health.ipynb", tmp_path, RECIPE="recipes/demo_chat.py",
                            OUTPUT_DIR=str(chat), BASE_RUN=str(drive), OVERRIDES=["train.max_steps=8"], UNTIL="merge",
                            INSTALL=False, UPLOAD_CORPUS=False, PLAN_GPU="cpu"))
    assert "no Modelfile yet" in sft and (chat / "merged" / "config.json").is_file()
    lineage = json.loads((chat / "manifest.json").read_text())["lineage"]
    assert lineage[-1]["recipe"] == "demo" and lineage[-1]["path"] == str(drive.resolve())
    assert (chat / "report.md").is_file()
