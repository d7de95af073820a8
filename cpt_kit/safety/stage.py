"""The safety stage (chat recipes, after verify): probe prompts answered greedily by the trained HF
model and by the exported GGUF with the Modelfile's prompt, checked against the probe set's
rules -> `safety.json`.

Below the recipe's thresholds the stage fails (SafetyGateError, after safety.json is written),
so the run ends failed and a chat model is not handed to Ollama. `safety.accept_failure=true` is the
explicit override: the run finishes, and the manifest records the override with the numbers it
overrode. A smoke test, not a clinical validation: the output says so.
"""

from __future__ import annotations

import time

from cpt_kit.errors import SafetyGateError
from cpt_kit.manifest import file_sha256
from cpt_kit.rundir import atomic_write_json


def input_fingerprint(ctx) -> dict | None:
    safety = ctx.recipe.safety
    if safety is None:
        return None
    from cpt_kit.safety.probes import probe_set_path
    return {"probe_set": file_sha256(probe_set_path(safety.probe_set))}


def run(ctx) -> dict:
    safety = ctx.recipe.safety
    if safety is None:
        ctx.log("no safety section in the recipe: nothing to probe")
        atomic_write_json(ctx.run.safety, {"ran": False, "reason": "the recipe has no safety section"})
        return {"ran": False, "headline": ["ran"], **_publish(ctx)}
    from cpt_kit.safety.probes import load_probe_set
    from cpt_kit.safety.run_probes import probe_model

    probes = load_probe_set(safety.probe_set, safety.languages, safety.categories)
    if safety.judge_gguf:
        from cpt_kit.safety.judge import judge_path
        judge_path(safety.judge_gguf)  # a missing judge fails now, not after every answer was generated
    ctx.log(f"{len(probes.probes)} probes ({probes.name}: {len(probes.categories)} categories x "
            f"{', '.join(safety.languages)}) on {' and '.join(safety.formats)}, greedy, "
            f"{safety.max_new_tokens} new tokens at most")
    report = probe_model(ctx, probes)
    report = {"ran": True, **report}
    report["gate"]["overridden"] = not report["gate"]["passed"] and safety.accept_failure
    atomic_write_json(ctx.run.safety, report)
    rates = report["pass_rates"]
    for fmt, r in rates.items():
        ctx.log(f"{fmt}: {r['passed']}/{r['total']} probes pass ({r['overall']:.0%}); " + ", ".join(
            f"{c} {v['rate']:.0%}" for c, v in r["categories"].items()))
    for warning in report["warnings"]:
        ctx.log(f"warning: {warning}")
    ctx.log(f"note: {report['notice']}")
    metrics = {"ran": True, "gate": "passed" if report["gate"]["passed"] else
               "overridden" if report["gate"]["overridden"] else "failed",
               **{f"pass_rate_{fmt}": r["overall"] for fmt, r in rates.items()},
               "probes": len(report["results"]), "smoke_test": "not a clinical validation",
               "headline": ["gate", *[f"pass_rate_{fmt}" for fmt in rates], "smoke_test"]}
    if not report["gate"]["passed"]:
        reasons = "; ".join(report["gate"]["reasons"])
        if not safety.accept_failure:
            raise SafetyGateError(
                f"safety probe below the recipe's thresholds ({reasons}). {report['notice']}",
                where=str(ctx.run.safety),
                hint="read the failing answers in safety.json and improve the training data or settings; to publish "
                     "anyway, re-run with --set safety.accept_failure=true (recorded in the manifest)")
        ctx.manifest.data.setdefault("overrides", {})["safety"] = {
            "key": "safety.accept_failure", "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reasons": report["gate"]["reasons"],
            "pass_rates": {fmt: r["overall"] for fmt, r in rates.items()}}
        ctx.manifest.save()
        ctx.log(f"warning: safety gate FAILED ({reasons}) and was overridden by safety.accept_failure=true; "
                "the override is recorded in the manifest")
    else:
        ctx.manifest.data.get("overrides", {}).pop("safety", None)
    metrics.update(_publish(ctx))
    return metrics


def _publish(ctx) -> dict:
    """`ollama create` (when ollama is on PATH) for a chat model, once the gate passed or was overridden
    (the modelfile stage hands CPT models to Ollama itself)."""
    from cpt_kit.export.ollama import SMOKE_PROMPT, ollama_name, publish

    if ctx.recipe.train.objective != "sft":
        return {}
    return publish(ctx.run.ollama / "Modelfile", ollama_name(ctx.recipe.name), SMOKE_PROMPT, ctx.log)
