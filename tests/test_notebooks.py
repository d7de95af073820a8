"""The Colab notebooks run headless on CPU with the offline demo recipe (papermill overrides their
parameters cell): a notebook that breaks fails the tests. Outputs are stripped in the repository."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "examples" / "colab"
FAST = ["train.max_steps=30", "export.quantizations=Q8_0"]


def test_notebooks_are_stripped_and_parameterised():
    books = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert [b.name for b in books] == ["domain.ipynb", "language.ipynb", "mental_health.ipynb"]
    for book in books:
        nb = json.loads(book.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c["outputs"] and c["execution_count"] is None for c in code), f"{book.name} has outputs"
        assert sum("parameters" in c["metadata"].get("tags", []) for c in code) == 1, book.name
        text = "\n".join("".join(c["source"]) for c in nb["cells"])
        for step in ('cpt_kit("plan"', 'cpt_kit("run"', "report.md", "ollama create", "INSTALL"):
            assert step in text, (book.name, step)


def _execute(name: str, tmp_path: Path, **parameters) -> dict:
    import papermill

    out = tmp_path / name
    papermill.execute_notebook(str(NOTEBOOKS / name), str(out), parameters=parameters, cwd=str(REPO),
                               kernel_name="python3", progress_bar=False, log_output=False)
    return json.loads(out.read_text())


def _printed(nb: dict) -> str:
    return "\n".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"])


@pytest.mark.slow
def test_notebooks_run_headless(tmp_path):
    run = tmp_path / "language-run"
    common = dict(RECIPE="recipes/demo.py", OUTPUT_DIR=str(run), INSTALL=False, UPLOAD_CORPUS=False, PLAN_GPU="cpu")
    language = _printed(_execute("language.ipynb", tmp_path, OVERRIDES=FAST, **common))
    assert "fits" in language and "ollama create demo -f Modelfile" in language
    assert (run / "report.md").is_file() and list((run / "report").glob("*.png"))
    # the domain notebook on the same run: finished stages are skipped, every cell still runs
    domain = _printed(_execute("domain.ipynb", tmp_path, OVERRIDES=FAST, **common))
    assert "skipped" in domain or "done already" in domain
    # the SFT notebook from that CPT run (the seeds' flow), through the merge
    chat = tmp_path / "chat-run"
    sft = _printed(_execute("mental_health.ipynb", tmp_path, RECIPE="recipes/demo_chat.py", OUTPUT_DIR=str(chat),
                            OVERRIDES=[f"model.base={run}", "train.max_steps=8"], UNTIL="merge", INSTALL=False,
                            UPLOAD_CORPUS=False, PLAN_GPU="cpu"))
    assert "no Modelfile yet" in sft and (chat / "merged" / "config.json").is_file()
    lineage = json.loads((chat / "manifest.json").read_text())["lineage"]
    assert lineage[-1]["recipe"] == "demo" and (chat / "report.md").is_file()
