"""Everything the report says, read from the run directory's files (nothing is recomputed).

Numbers come from `manifest.json` (each stage's metrics, timings, the recipe, the lineage) and
from the files the stages wrote: `logs/train.jsonl` (curves), `data/stats.json` (documents kept
and dropped), `verify.json`, `safety.json`. A missing file means that part of the run did not
happen; the report then leaves its section out rather than guessing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpt_kit.rundir import RunDir


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


@dataclass
class Facts:
    run: RunDir
    manifest: dict[str, Any]
    train_log: list[dict[str, Any]]
    stats: dict[str, Any] | None
    verify: dict[str, Any] | None
    safety: dict[str, Any] | None

    @classmethod
    def read(cls, run: RunDir) -> "Facts":
        from cpt_kit.errors import CptKitError

        manifest = _json(run.manifest)
        if not isinstance(manifest, dict):
            raise CptKitError(f"{run.manifest} is missing or unreadable: {run.root} is not a cpt-kit run",
                              where=str(run.root), hint="pass the run directory that `cpt-kit run` wrote")
        log = run.logs / "train.jsonl"
        records = []
        if log.is_file():
            for line in log.read_text(encoding="utf-8").splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill: the rest of the log is still good
                    continue
        return cls(run, manifest, _latest_session(records), _json(run.data / "stats.json"), _json(run.verify),
                   _json(run.root / "safety.json"))

    # --------------------------------------------------------------- manifest
    @property
    def recipe(self) -> dict[str, Any]:
        return self.manifest.get("recipe", {})

    @property
    def name(self) -> str:
        return self.recipe.get("name", self.run.root.name)

    def stage(self, name: str) -> dict[str, Any]:
        return self.manifest.get("stages", {}).get(name, {})

    def metrics(self, name: str) -> dict[str, Any]:
        return self.stage(name).get("metrics", {})

    def done(self, name: str) -> bool:
        return self.stage(name).get("status") == "done"

    def failed(self) -> list[tuple[str, str]]:
        """(stage, error) of each stage the manifest records as failed."""
        return [(name, entry.get("error", "")) for name, entry in self.manifest.get("stages", {}).items()
                if entry.get("status") == "failed"]

    # --------------------------------------------------------------- derived series
    def perplexity_bars(self) -> list[tuple[str, float]]:
        """(label, perplexity) in the order a reader compares them: base, trained, replay, then the merged
        HF model and each exported GGUF on verify's blocks."""
        bars = []
        ev = self.metrics("evaluate")
        for key, label in (("ppl_base", "base"), ("ppl_trained", "trained"),
                           ("replay_ppl_base", "replay: base"), ("replay_ppl_trained", "replay: trained")):
            if isinstance(ev.get(key), (int, float)):
                bars.append((label, float(ev[key])))
        for name, scored in self.format_perplexities().items():
            if math.isfinite(scored["perplexity"]):
                bars.append(("merged HF" if name == "HF" else f"GGUF {name}", scored["perplexity"]))
        return bars

    def format_perplexities(self) -> dict[str, dict[str, Any]]:
        """{"HF": {"perplexity", "ci95", "tokens"}, "F16": {..., "delta"}, ...}: the merged HF model and each
        exported GGUF scored on the same blocks, from verify.json (written also when verify fails); delta is
        the GGUF's perplexity relative to HF's."""
        check = self.verify_checks().get("perplexity") or {}
        if not isinstance(check.get("hf"), (int, float)):
            return {}
        scored = {"HF": {"perplexity": float(check["hf"]), "ci95": check.get("hf_ci95"), "tokens": check.get("tokens")}}
        for name, result in check.get("formats", {}).items():
            scored[name] = {"perplexity": float(result["perplexity"]), "ci95": result.get("ci95"),
                            "tokens": result.get("tokens"), "delta": result.get("delta")}
        return scored

    def verify_checks(self) -> dict[str, dict[str, Any]]:
        """verify.json's checks by name (tokenizer, perplexity, quantizations, chat_template, control_tokens, stop)."""
        return (self.verify or {}).get("checks") or {}

    def documents(self) -> dict[str, Any] | None:
        """Counts of the main data as prepare wrote them: {"read", "kept", "dropped": {reason: n}, ...} of the
        corpus documents (CPT: stats["corpus"]["documents"]) or of the conversations (SFT:
        stats["conversations"], which also counts "truncated")."""
        stats = self.stats or {}
        counts = (stats.get("corpus") or {}).get("documents") if "corpus" in stats else stats.get("conversations")
        return counts if isinstance(counts, dict) and isinstance(counts.get("kept"), int) else None

    @property
    def unit(self) -> str:
        """What the main data is counted in: "documents" (CPT) or "conversations" (SFT)."""
        return "conversations" if "conversations" in (self.stats or {}) else "documents"

    def document_counts(self) -> dict[str, int]:
        """{"kept": n, "<drop reason>": n, ...}: every drop reason prepare counted, in its order."""
        counts = self.documents()
        if counts is None:
            return {}
        dropped = counts.get("dropped") or {}
        return {"kept": counts["kept"], **{str(k): int(v) for k, v in dropped.items() if isinstance(v, int)}}

    def safety_rates(self) -> dict[str, dict[str, float]]:
        """{format: {category: pass rate}} from safety.json."""
        rates = (self.safety or {}).get("pass_rates", {})
        return {fmt: {cat: v["rate"] for cat, v in r.get("categories", {}).items()}
                for fmt, r in rates.items() if isinstance(r, dict) and r.get("categories")}

    def files(self) -> list[tuple[str, int]]:
        """(path relative to the run, size in bytes) of what a user takes away: the GGUF models (not the
        gguf stage's working files such as imatrix.gguf), the Modelfile, the merged model, the adapter."""
        found = []
        for pattern in (f"gguf/{self.name}-*.gguf", "ollama/Modelfile*", "merged/*.safetensors",
                        "adapter/*.safetensors"):
            for path in sorted(self.run.root.glob(pattern)):
                found.append((str(path.relative_to(self.run.root)), path.stat().st_size))
        return found


def _latest_session(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Training records of the run as it stands: a resumed run logs steps again from its checkpoint,
    so a later record of a step replaces the earlier one."""
    by_key: dict[tuple[int, bool], dict[str, Any]] = {}
    for record in records:
        if "step" not in record or "event" in record:
            continue
        by_key[(record["step"], "eval_loss" in record)] = record
    return [by_key[k] for k in sorted(by_key)]
