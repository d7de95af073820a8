"""Which stages a run redoes, and why: each stage's fingerprint basis compared with the manifest.

A stage's basis is what its output depends on: the values of the recipe fields it declares
(`Stage.reads`), the content records of the run files it declares (`Stage.inputs`: of those,
the files an earlier stage recorded as its outputs, so a file a user drops into data/train is not
an input; see input_records) and
`input_fingerprint(ctx)` of its module (files outside the run: corpus, base tokenizer, tool
versions). A finished stage is done while its basis is unchanged and the outputs recorded when it
finished are still on disk, unchanged. Stages are not chained: a stage redoes only because
something it reads changed.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from typing import Any

from cpt_kit.errors import CptKitError
from cpt_kit.file_records import file_record, files_under, problems
from cpt_kit.manifest import fingerprint

SHOWN = 3
"""Changed keys/files named per reason (the rest are counted)."""


@dataclass(frozen=True)
class Basis:
    """What a stage's fingerprint is made of; stored in the manifest so a rerun can say what changed."""

    fields: dict[str, Any]
    inputs: dict[str, dict]
    external: Any

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.fields, self.inputs, self.external)

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps({"fields": self.fields, "inputs": self.inputs, "external": self.external},
                                     default=str))


def field_values(recipe, keys: tuple[str, ...]) -> dict[str, Any]:
    """{dotted key: value} of the recipe (JSON data, as in manifest.json)."""
    data = recipe.to_dict()
    values = {}
    for key in keys:
        node: Any = data
        for part in key.split("."):
            node = node[part] if isinstance(node, dict) else None
        values[key] = node
    return values


def input_records(ctx, paths: tuple[str, ...]) -> dict[str, dict]:
    """{run file: record} of what a stage reads under its declared input paths: the files that the
    stages of this run recorded as their outputs there, or every file under a path no stage recorded
    outputs in (an adapter `cpt-kit export --adapter` copied in, logs/, a run of an older cpt-kit)."""
    root = ctx.run.root
    written = {rel for entry in ctx.manifest.data.get("stages", {}).values() for rel in entry.get("outputs", {})}
    chosen: set[str] = set()
    for path in paths:
        found = files_under(root, [path])
        chosen.update([rel for rel in found if rel in written] or found)
    return {rel: file_record(root / rel) for rel in sorted(chosen)}


def basis(stage, ctx) -> Basis:
    module = importlib.import_module(stage.module)
    external = module.input_fingerprint(ctx) if hasattr(module, "input_fingerprint") else None
    return Basis(field_values(ctx.recipe, stage.reads), input_records(ctx, stage.inputs), external)


@dataclass
class Assessment:
    """Why a stage must run (empty: done and intact) and whether that redoes finished work the
    recipe or the user's files changed (which needs --force)."""

    basis: Basis
    reasons: list[str] = field(default_factory=list)
    recipe_changed: bool = False


def assess(stage, ctx) -> Assessment:
    now = basis(stage, ctx)
    entry = ctx.manifest.stage(stage.name)
    status = entry.get("status")
    found = Assessment(now)
    if status == "external":
        return found
    if status in (None, "running", "failed"):
        found.reasons.append({None: "not run yet", "running": "interrupted before it finished",
                              "failed": "failed last time"}[status])
        return found
    if status == "stale":
        found.reasons.append(entry.get("stale_because", "marked stale"))
    recorded = entry.get("basis")
    if recorded is None:
        found.reasons.append("finished under an older cpt-kit (no record of what it read)")
        found.recipe_changed = True
        return found
    current = now.to_json()
    changed = changed_keys(recorded.get("fields", {}), current["fields"])
    if changed:
        found.reasons.append("recipe changed: " + _some(changed))
        found.recipe_changed = True
    if recorded.get("external") != current["external"]:
        found.reasons.append("its files outside the run changed (corpus, base tokenizer or tool version)")
        found.recipe_changed = True
    old, new = recorded.get("inputs", {}), current["inputs"]
    inputs = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if inputs:
        found.reasons.append("inputs changed: " + _some(inputs))
    broken = problems(ctx.run.root, entry.get("outputs", {}))
    if broken:
        found.reasons.append("outputs " + _some(broken))
    return found


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON values."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [k for key in keys for k in changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _some(items: list[str]) -> str:
    more = f" (+{len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def providers(stage, table) -> list:
    """The earlier stages whose outputs this stage reads."""
    earlier = table[: [s.name for s in table].index(stage.name)]
    return [s for s in earlier if any(_overlaps(i, o) for i in stage.inputs for o in s.outputs)]


def upstream(stage, table) -> list:
    """Every stage this one depends on, directly or through others, in table order."""
    found = {s.name for s in providers(stage, table)}
    for provider in providers(stage, table):
        found |= {s.name for s in upstream(provider, table)}
    return [s for s in table if s.name in found]


def dependents(stage, table) -> list:
    """Every later stage that depends on this one."""
    return [s for s in table if stage.name in {u.name for u in upstream(s, table)}]


@dataclass
class Step:
    stage: Any
    action: str
    """"run" or "skip"."""
    reasons: list[str]
    """Why it runs (empty when skipped)."""
    needs_force: bool
    """It redoes finished work because the recipe (or a file outside the run it reads) changed."""


@dataclass
class Plan:
    """What `run` will do: each selected stage, whether it runs, and why."""

    steps: list[Step]

    @property
    def conflicts(self) -> list[str]:
        return [s.stage.name for s in self.steps if s.needs_force]


def plan_stages(ctx, table, selected, only: str | None, force: bool) -> Plan:
    """Assess the `selected` stages of `table` in order; a stage after one that runs runs too (it is
    re-checked right before its turn: if its inputs came out the same, it is skipped then)."""
    steps: list[Step] = []
    running: set[str] = set()
    for stage in selected:
        found = assess(stage, ctx)
        reasons = list(found.reasons)
        after = [p.name for p in providers(stage, table) if p.name in running]
        if after and not reasons:
            reasons.append(f"after {', '.join(after)}, if that changes what it reads")
        if only and force and not reasons:
            reasons.append("--stage with --force")
        if reasons:
            running.add(stage.name)
        steps.append(Step(stage, "run" if reasons else "skip", reasons, found.recipe_changed and not force))
    if only:
        for needed in upstream(selected[0], table):
            missing = assess(needed, ctx).reasons
            if missing:
                raise CptKitError(f"stage {only!r} needs {needed.name!r}, which is not done for this recipe "
                                  f"({'; '.join(missing)})", where=str(ctx.run.root),
                                  hint=f"run with --until {only} instead of --stage {only}")
    return Plan(steps)


def describe_plan(plan: Plan) -> list[str]:
    return [f"{step.action:<4} {step.stage.name:<10} " + ("; ".join(step.reasons) if step.reasons else "done, outputs intact")
            for step in plan.steps]
