"""The run report on the files of real runs (tests/data/report, see its README): every number in its
quality, data and verify tables equals the source file's, the plots are valid PNGs with the expected
series, and a failed run's report says where it failed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cpt_kit.errors import CptKitError
from cpt_kit.report import fmt, write_report
from cpt_kit.report.facts import Facts
from cpt_kit.report.plots import figures
from cpt_kit.report.render import percent
from cpt_kit.rundir import RunDir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REAL_RUNS = Path(__file__).parent / "data" / "report"


def real_run(tmp_path: Path, name: str) -> RunDir:
    """A copy of the report's input files of a real run: demo (CPT with replay, 3 GGUFs), demo_chat (SFT
    from demo's run, safety gate overridden), extended (prepare only: dropped documents and a tokenizer
    extension)."""
    shutil.copytree(REAL_RUNS / name, tmp_path / name)
    return RunDir(tmp_path / name)


def read(run: RunDir, name: str):
    return json.loads((run.root / name).read_text(encoding="utf-8"))


def tables(text: str) -> dict[str, list[list[dict[str, str]]]]:
    """{section heading: [table as a list of {column: cell}]} of a Markdown report."""
    found: dict[str, list] = {}
    heading, lines, i = "", text.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("#"):
            heading = lines[i].lstrip("#").strip()
        elif lines[i].startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header, rows = _cells(lines[i]), []
            i += 2
            while i < len(lines) and lines[i].startswith("| "):
                rows.append(dict(zip(header, _cells(lines[i]))))
                i += 1
            found.setdefault(heading, []).append(rows)
            continue
        i += 1
    return found


def _cells(line: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]


def by_first_column(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {next(iter(row.values())): row for row in rows}


def interval(pair) -> str:
    return f"{fmt(pair[0])} - {fmt(pair[1])}"


def test_every_number_of_a_cpt_run_equals_its_source_file(tmp_path):
    run = real_run(tmp_path, "demo")
    text = write_report(run).read_text()
    manifest, stats, verify = read(run, "manifest.json"), read(run, "data/stats.json"), read(run, "verify.json")
    found = tables(text)

    quality = by_first_column(found["How good is it"][0])
    ev = manifest["stages"]["evaluate"]["metrics"]
    for label, key, tokens in (("held-out text, base model", "ppl_base", "heldout_tokens"),
                               ("held-out text, trained model", "ppl_trained", "heldout_tokens"),
                               ("replay (general) text, base model", "replay_ppl_base", "replay_tokens"),
                               ("replay (general) text, trained model", "replay_ppl_trained", "replay_tokens")):
        row = quality[label]
        assert (row["value"], row["95% interval"], row["tokens"]) == (fmt(ev[key]), interval(ev[key + "_ci"]),
                                                                     fmt(ev[tokens]))
    assert quality["held-out text, trained model"]["change"] == f"{ev['ppl_change_pct']:+.4g}% ({ev['ppl_change_ci95']}) vs base"
    assert quality["replay (general) text, trained model"]["change"] == \
        f"{ev['replay_ppl_change_pct']:+.4g}% ({ev['replay_ppl_change_ci95']}) vs base"
    scored = verify["checks"]["perplexity"]
    hf = quality["merged HF model (transformers), verify's blocks"]
    assert (hf["value"], hf["95% interval"], hf["tokens"]) == (fmt(scored["hf"]), interval(scored["hf_ci95"]),
                                                               fmt(scored["tokens"]))
    for name, result in scored["formats"].items():
        row = quality[f"exported {name} GGUF (llama.cpp)"]
        assert row == {"perplexity on": f"exported {name} GGUF (llama.cpp)", "value": fmt(result["perplexity"]),
                       "95% interval": interval(result["ci95"]), "tokens": fmt(result["tokens"]),
                       "change": f"{percent(result['delta'])} vs merged HF"}
    assert len(quality) == 4 + 1 + 3 and not any("delta" in label for label in quality)  # no ppl_delta_* rows

    documents, prepared = found["Data"][0], by_first_column(found["Data"][1])
    corpus, replay = stats["corpus"]["documents"], stats["replay"]["documents"]
    assert [(r["documents"], r["corpus"], r["replay text"]) for r in documents] == \
        [("read", fmt(corpus["read"]), fmt(replay["read"])), ("kept", fmt(corpus["kept"]), fmt(replay["kept"]))] + \
        [(f"dropped: {reason}", fmt(n), fmt(replay["dropped"][reason])) for reason, n in corpus["dropped"].items()]
    expected = {"corpus tokens": stats["corpus"]["tokens"]["total"], "corpus words": stats["corpus"]["words"],
                "fertility (tokens per word)": stats["corpus"]["fertility"],
                "training blocks of 128 tokens": stats["train"]["blocks"],
                "training blocks from the corpus": stats["train"]["corpus_blocks"],
                "training blocks from replay text": stats["train"]["replay_blocks"],
                "training tokens": stats["train"]["tokens"], "held-out blocks": stats["heldout"]["blocks"],
                "held-out tokens": stats["heldout"]["tokens"],
                "replay share of training blocks": stats["replay"]["share_achieved"],
                "replay share wanted": stats["replay"]["fraction_wanted"],
                "replay held-out blocks": stats["replay"]["heldout_blocks"], "vocabulary": stats["vocab_size"]}
    assert {label: row["value"] for label, row in prepared.items()} == {k: fmt(v) for k, v in expected.items()}

    checks = by_first_column(found["Export verification"][0])
    assert list(checks) == ["tokenizer", "perplexity", "quantizations"] == list(verify["checks"])
    assert all(row["result"] == "passed" for row in checks.values())
    tok = verify["checks"]["tokenizer"]
    assert checks["tokenizer"]["key numbers"].startswith(f"{tok['texts'] - tok['mismatched']}/{tok['texts']} probe texts")
    assert f"vocabulary {fmt(tok['hf_vocab'])} / {fmt(tok['gguf_vocab'])}" in checks["tokenizer"]["key numbers"]
    assert checks["perplexity"]["key numbers"] == (
        f"F16 GGUF {percent(scored['formats']['F16']['delta'])} vs merged HF (limit {fmt(scored['max_delta'] * 100)}%) "
        f"on {fmt(scored['tokens'])} tokens ({scored['blocks']} heldout blocks)")
    quants = verify["checks"]["quantizations"]
    assert checks["quantizations"]["key numbers"] == "; ".join(
        [f"{q}: perplexity {percent(g['ppl_delta'])} vs F16 (limit {fmt(g['max_ppl_delta'] * 100)}%), mean KL "
         f"{fmt(g['mean_kl'])} (limit {fmt(g['max_kl'])}), same top token {fmt(g['same_top_token'] * 100)}%"
         for q, g in quants["formats"].items()] + [f"ollama/Modelfile serves {quants['modelfile_quant']}"])
    for warning in verify["warnings"]:
        assert f"- {warning}\n" in text

    listed = {(r["stage"], r["metric"]): r["value"] for r in found["All metrics"][0]}
    checked = 0
    for stage, entry in manifest["stages"].items():
        for key, value in entry["metrics"].items():
            if isinstance(value, (int, float, str, bool)) and len(str(value)) <= 80 and key != "headline":
                assert listed[(stage, key)] == fmt(value), (stage, key)
                checked += 1
    assert checked == len(listed) > 80
    assert "594.9 -> **35.93** (-94.0%)" in text
    assert "ollama create demo -f" in text and "every model of the lineage: `eval/comparison.md`" in text


def test_the_report_names_itself_lists_what_a_user_takes_away_and_puts_loss_first(tmp_path):
    run = real_run(tmp_path, "demo")
    manifest = read(run, "manifest.json")
    manifest["stages"]["report"] = {"status": "running"}  # as the report stage sees the manifest
    run.manifest.write_text(json.dumps(manifest))
    for name in ("demo-F16.gguf", "demo-Q8_0.gguf", "imatrix.gguf"):
        (run.root / "gguf").mkdir(exist_ok=True)
        (run.root / "gguf" / name).write_bytes(b"GGUF" + bytes(200_000))
    text = write_report(run).read_text()
    found = tables(text)
    assert by_first_column(found["Stages"][0])["report"] == {"stage": "report", "status": "this report", "time": "",
                                                             "key numbers": ""}
    assert [r["file"] for r in found["Files"][0]] == ["`gguf/demo-F16.gguf`", "`gguf/demo-Q8_0.gguf`",
                                                      "`ollama/Modelfile`"]  # imatrix.gguf is a working file
    curves = re.findall(r"^!\[[^]]*\]\(report/(\w+)\.png\)", text.split("## Curves")[1].split("\n## ")[0], re.M)
    assert curves == ["loss", "learning_rate", "throughput", "perplexity"]


def test_dropped_documents_and_a_tokenizer_extension_from_real_prepare_output(tmp_path):
    run = real_run(tmp_path, "extended")
    stats = read(run, "data/stats.json")
    dropped = stats["corpus"]["documents"]["dropped"]
    assert sum(dropped.values()) == 6  # the fixture's corpus has an empty file, 2 short ones and 3 copies
    found = tables(write_report(run).read_text())
    documents = by_first_column(found["Data"][0])
    for reason, n in dropped.items():
        assert documents[f"dropped: {reason}"]["corpus"] == fmt(n)
    prepared = by_first_column(found["Data"][1])
    extension = stats["tokenizer_extension"]
    assert prepared["tokenizer extension: new tokens"]["value"] == fmt(extension["added"]) == "48"
    assert prepared["fertility before the extension"]["value"] == fmt(extension["fertility_before"])
    assert prepared["fertility after the extension"]["value"] == fmt(extension["fertility_after"])
    assert extension["fertility_after"] < extension["fertility_before"]
    bars = figures(Facts.read(run))["data"].axes[0].patches
    assert [b.get_width() for b in bars] == [stats["corpus"]["documents"]["kept"], *dropped.values()]


def test_a_chat_run_reports_conversations_checks_and_safety_from_its_files(tmp_path):
    run = real_run(tmp_path, "demo_chat")
    text = write_report(run).read_text()
    stats, verify, safety = read(run, "data/stats.json"), read(run, "verify.json"), read(run, "safety.json")
    found = tables(text)
    conversations = by_first_column(found["Data"][0])
    assert conversations["read"]["count"] == fmt(stats["conversations"]["read"])
    assert conversations["kept"]["count"] == fmt(stats["conversations"]["kept"])
    assert conversations["truncated at a turn boundary"]["count"] == fmt(stats["conversations"]["truncated"])
    prepared = by_first_column(found["Data"][1])
    for key, label in (("conversations", "conversations"), ("tokens", "tokens"),
                       ("trained_tokens", "trained tokens (assistant turns)"), ("trained_share", "trained share")):
        assert (prepared[label]["train"], prepared[label]["held out"]) == (fmt(stats["train"][key]),
                                                                          fmt(stats["heldout"][key]))
    checks = by_first_column(found["Export verification"][0])
    assert list(checks) == [name.replace("_", " ") for name in verify["checks"]]
    assert "chat template" in checks and "stop" in checks and "control tokens" in checks
    assert f"after {verify['checks']['stop']['natural']['tokens']} tokens" in checks["stop"]["key numbers"]
    rows = found["Safety probe"][0]
    for model, rates in safety["pass_rates"].items():
        for category, v in rates["categories"].items():
            assert {"model": model, "category": category, "pass rate": fmt(v["rate"]),
                    "passed": f"{v['passed']}/{v['total']}"} in rows
    assert "not a clinical validation" in text and "overridden by the user" in text
    assert "demo -> demo_chat" in text  # lineage


def test_plots_are_valid_pngs_with_the_expected_series(tmp_path):
    run = real_run(tmp_path, "demo_chat")
    write_report(run)
    pngs = sorted(p.name for p in (run.root / "report").glob("*.png"))
    assert pngs == ["data.png", "learning_rate.png", "loss.png", "perplexity.png", "safety.png", "throughput.png"]
    import matplotlib.image
    for png in (run.root / "report").glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert matplotlib.image.imread(png).shape[0] > 100
    facts = Facts.read(run)
    made = figures(facts)
    assert list(made) == ["loss", "learning_rate", "throughput", "perplexity", "data", "safety"]
    loss = made["loss"].axes[0].get_lines()
    log = [json.loads(line) for line in (run.logs / "train.jsonl").read_text().splitlines()]
    assert list(loss[0].get_xdata()) == [r["step"] for r in log if "loss" in r]
    assert list(loss[1].get_ydata()) == [r["eval_loss"] for r in log if "eval_loss" in r]
    assert len(made["learning_rate"].axes[0].get_lines()) == 2  # LoRA and embed_tokens/lm_head
    ev, scored = facts.metrics("evaluate"), read(run, "verify.json")["checks"]["perplexity"]
    assert [b.get_height() for b in made["perplexity"].axes[0].patches] == \
        [ev["ppl_base"], ev["ppl_trained"], scored["hf"], *(f["perplexity"] for f in scored["formats"].values())]
    categories = read(run, "safety.json")["pass_rates"]["hf"]["categories"]
    assert len(made["safety"].axes[0].patches) == 2 * len(categories)  # (hf, gguf) x categories
    assert [b.get_width() for b in made["data"].axes[0].patches] == [64]  # kept; this run dropped nothing


def test_a_run_that_failed_at_the_safety_gate_reports_where_and_no_ollama_lines(tmp_path):
    """The manifest and safety.json as a failed gate leaves them (the real chain: test_chain)."""
    run = real_run(tmp_path, "demo_chat")
    manifest, safety = read(run, "manifest.json"), read(run, "safety.json")
    error = ("/runs/demo_chat/safety.json: safety probe below the recipe's thresholds (hf: overall pass rate 0% < 90%)."
             "\n  -> read the failing answers in safety.json")
    manifest["stages"]["safety"] = {"status": "failed", "seconds": 8.1, "error": error}
    manifest.pop("overrides")
    safety["gate"]["overridden"] = False
    run.manifest.write_text(json.dumps(manifest))
    (run.root / "safety.json").write_text(json.dumps(safety))
    text = write_report(run).read_text()
    assert text.index("**This run failed at safety.**") < text.index("## Stages")
    assert f"```\nsafety: {error}\n```" in text
    assert by_first_column(tables(text)["Stages"][0])["safety"]["key numbers"] == error.split("\n")[0]
    assert len(tables(text)["Safety probe"][0]) == 2 * (9 + 1)  # (hf, gguf) x (9 categories + overall)
    assert "Gate: **failed: the model is not published**" in text
    assert "ollama create" not in text and "ollama run" not in text and "Not yet: the run failed at safety" in text


def test_a_partial_run_reports_what_exists(tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.manifest.write_text(json.dumps({"recipe": {"name": "x"}, "stages": {
        "prepare": {"status": "failed", "error": "too small\nmore"}}}))
    text = write_report(run).read_text()
    assert "**This run failed at prepare.**" in text and "```\nprepare: too small\nmore\n```" in text
    assert not list((run.root / "report").glob("*.png"))


def test_not_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(CptKitError, match="not a cpt-kit run"):
        write_report(RunDir(tmp_path))


def test_cli_report_regenerates_from_files_and_records_them(tmp_path):
    run = real_run(tmp_path, "demo")
    out = subprocess.run([sys.executable, "-m", "cpt_kit.cli", "report", str(run.root)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (run.root / "report.md").is_file() and (run.root / "report.html").is_file()
    entry = read(run, "manifest.json")["stages"]["report"]
    assert entry["status"] == "done" and "report.md" in entry["outputs"] and "report/loss.png" in entry["outputs"]
    assert "| report | this report |" in (run.root / "report.md").read_text()
