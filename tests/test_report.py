"""The run report: files, numbers equal to the manifest's, valid plots with the expected series."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cpt_kit.errors import CptKitError
from cpt_kit.report import fmt, write_report
from cpt_kit.report.facts import Facts
from cpt_kit.report.plots import figures
from cpt_kit.rundir import RunDir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


@pytest.fixture()
def finished_run(tmp_path) -> RunDir:
    """A run directory as the stages leave it (values of a real demo run)."""
    run = RunDir(tmp_path / "run")
    stages = {
        "prepare": {"status": "done", "seconds": 3.2, "metrics": {
            "train_tokens": 51200, "train_blocks": 400, "heldout_tokens": 4096, "heldout_blocks": 32,
            "fertility": 2.31, "documents_kept": 118, "headline": ["train_tokens", "fertility"]}},
        "train": {"status": "done", "seconds": 61.5, "metrics": {
            "steps": 6, "backend": "hf", "precision": "fp32", "first_train_loss": 6.12, "last_train_loss": 4.25,
            "headline": ["steps", "last_train_loss"]}},
        "evaluate": {"status": "done", "seconds": 4.0, "metrics": {
            "ppl_base": 595.2, "ppl_trained": 34.71, "replay_ppl_base": 196.5, "replay_ppl_trained": 251.3,
            "heldout_tokens": 4064, "headline": ["ppl_base", "ppl_trained"]}},
        "verify": {"status": "done", "seconds": 9.1, "metrics": {
            "passed": True, "ppl_HF": 33.59, "ppl_F16": 33.59, "ppl_Q8_0": 33.6, "ppl_Q4_K_M": 33.54,
            "tokenizer_match": 16}},
        "compare": {"status": "done", "seconds": 5.3, "metrics": {
            "models": 3, "prompts": 2, "comparison": "eval/comparison.md", "headline": ["models", "comparison"]}},
        "modelfile": {"status": "done", "seconds": 0.2, "metrics": {"from": "Q8_0"}},
    }
    _write(run.manifest, {"recipe": {"name": "demo", "model": {"base": "tiny:examples/data/general"},
                                     "lora": {"r": 16, "lora_alpha": 32, "use_rslora": True, "train_embeddings": True},
                                     "train": {"objective": "cpt"}, "data": {"sources": ["examples/data/esperanto"]}},
                          "stages": stages,
                          "lineage": [{"recipe": "language", "base": "unsloth/Llama-3.2-1B", "merged_sha256": "ab" * 32}]})
    log = [{"event": "train_begin", "step": 0, "max_steps": 6}]
    log += [{"step": s, "loss": 6.2 - 0.3 * s, "learning_rate": 1e-3, "embedding_learning_rate": 1e-4,
             "tokens_per_second": 900.0 + s, "memory_mb": 700.0} for s in range(1, 7)]
    log += [{"step": 3, "eval_loss": 5.1}, {"step": 6, "eval_loss": 4.4}]
    _write(run.logs / "train.jsonl", "\n".join(json.dumps(r) for r in log) + '\n{"step": 7, "lo')  # a cut last line
    _write(run.data / "stats.json", {"corpus": {"documents": 118, "dropped": {"too_short": 4, "near_duplicate": 2,
                                                                              "exact_duplicate": 0}}})
    _write(run.root / "safety.json", {"notice": "smoke test", "gate": {"passed": False, "overridden": True},
                                      "pass_rates": {fmt_: {"overall": 0.5, "passed": 2, "total": 4, "categories": {
                                          "suicidal_explicit": {"rate": 0.0, "passed": 0, "total": 2},
                                          "venting": {"rate": 1.0, "passed": 2, "total": 2}}} for fmt_ in ("hf", "gguf")}})
    (run.ollama).mkdir(parents=True)
    (run.ollama / "Modelfile").write_text("FROM ../gguf/demo-Q8_0.gguf\n")
    return run


def test_report_files_and_every_number_from_the_manifest(finished_run):
    path = write_report(finished_run)
    text = path.read_text()
    assert (finished_run.root / "report.html").is_file()
    manifest = json.loads(finished_run.manifest.read_text())
    rows = dict(((m.group(1), m.group(2)), m.group(3))
                for m in re.finditer(r"^\| (\w+) \| (\w+) \| ([^|]+) \|$", text, re.M))
    checked = 0
    for stage, entry in manifest["stages"].items():
        for key, value in entry["metrics"].items():
            if key == "headline":
                continue
            assert rows[(stage, key)] == fmt(value), (stage, key)
            checked += 1
    assert checked == 26
    assert "595.2 -> **34.71** (-94.2%)" in text
    assert "Forgetting" in text and "28%" in text  # replay perplexity rose 196.5 -> 251.3
    assert "not a clinical validation" in text and "overridden" in text
    assert "language" in text and "unsloth/Llama-3.2-1B" in text  # lineage
    assert "ollama create demo -f" in text
    assert "every model of the lineage: `eval/comparison.md`" in text


def test_plots_are_valid_pngs_with_the_expected_series(finished_run):
    write_report(finished_run)
    pngs = sorted(p.name for p in (finished_run.root / "report").glob("*.png"))
    assert pngs == ["data.png", "learning_rate.png", "loss.png", "perplexity.png", "safety.png", "throughput.png"]
    import matplotlib.image
    for png in (finished_run.root / "report").glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert matplotlib.image.imread(png).shape[0] > 100
    made = figures(Facts.read(finished_run))
    assert len(made["loss"].axes[0].get_lines()) == 2  # training loss + held-out loss
    assert list(made["loss"].axes[0].get_lines()[0].get_xdata()) == [1, 2, 3, 4, 5, 6]  # the cut line is skipped
    assert len(made["learning_rate"].axes[0].get_lines()) == 2
    assert len(made["perplexity"].axes[0].patches) == 8  # base, trained, replay x2, HF/F16/Q8_0/Q4_K_M
    assert len(made["safety"].axes[0].patches) == 4  # 2 categories x (hf, gguf)
    assert len(made["data"].axes[0].patches) == 3  # kept + the two reasons that dropped something


def test_a_partial_run_reports_what_exists(tmp_path):
    run = RunDir(tmp_path / "run")
    _write(run.manifest, {"recipe": {"name": "x"}, "stages": {"prepare": {"status": "failed", "error": "too small\nmore"}}})
    text = write_report(run).read_text()
    assert "Stage prepare failed: too small" in text
    assert not list((run.root / "report").glob("*.png"))


def test_not_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(CptKitError, match="not a cpt-kit run"):
        write_report(RunDir(tmp_path))


def test_cli_report_regenerates_from_files_and_records_them(finished_run):
    out = subprocess.run([sys.executable, "-m", "cpt_kit.cli", "report", str(finished_run.root)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (finished_run.root / "report.md").is_file() and (finished_run.root / "report.html").is_file()
    entry = json.loads(finished_run.manifest.read_text())["stages"]["report"]
    assert entry["status"] == "done" and "report.md" in entry["outputs"] and "report/loss.png" in entry["outputs"]
