"""Runs the stages of a recipe in order into a run directory, skipping what is already done.

Each stage is a module with `run(ctx: StageContext) -> dict` (its metrics, stored in the
manifest). A stage's fingerprint hashes the recipe sections it depends on, the fingerprint of
the stage before it, and (optionally) `input_fingerprint(ctx)` from its module (content hashes
of the corpus files, for example), so changing anything upstream re-runs what follows.
"""

from __future__ import annotations

import importlib
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cpt_kit.errors import CptKitError
from cpt_kit.manifest import Manifest, fingerprint, library_versions
from cpt_kit.recipe import STAGES, Recipe
from cpt_kit.rundir import RunDir, atomic_write_text


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    sections: tuple[str, ...]
    """Recipe keys (dotted) whose values change this stage's output."""


STAGE_TABLE: tuple[Stage, ...] = (
    Stage("prepare", "cpt_kit.data.prepare", ("model.base", "model.tokenizer", "model.revision",
                                              "model.max_seq_length", "data")),
    Stage("train", "cpt_kit.train.stage", ("model", "lora", "train")),
    Stage("evaluate", "cpt_kit.evaluate", ("eval",)),
    Stage("merge", "cpt_kit.export.merge_stage", ()),
    Stage("gguf", "cpt_kit.export.gguf_stage", ("export.outtype", "export.quantizations")),
    Stage("modelfile", "cpt_kit.export.modelfile_stage", ("export.modelfile", "export.modelfile_quant",
                                                          "export.adapter_modelfile", "model.max_seq_length")),
    Stage("verify", "cpt_kit.export.verify_stage", ("export",)),
)
assert tuple(s.name for s in STAGE_TABLE) == STAGES


@dataclass
class StageContext:
    """What a stage gets: the recipe, the run's paths, the manifest, a console, and its fingerprint."""

    recipe: Recipe
    run: RunDir
    manifest: Manifest
    console: Any
    fingerprint: str = ""
    resume: bool = False
    """True when the same stage (same fingerprint) was interrupted before: continue where it stopped."""
    notes: list[str] = field(default_factory=list)

    def log(self, message: str) -> None:
        self.console.print(f"  {message}")

    @property
    def hardware(self):
        from cpt_kit.hardware import detect
        if not hasattr(self, "_hardware"):
            self._hardware = detect()
        return self._hardware


def section_values(recipe: Recipe, keys: tuple[str, ...]) -> dict[str, Any]:
    data = recipe.to_dict()
    values = {}
    for key in keys:
        node: Any = data
        for part in key.split("."):
            node = node[part]
        values[key] = node
    return values


def stage_fingerprints(ctx_factory: Callable[[], StageContext], stages: tuple[Stage, ...]) -> dict[str, str]:
    ctx = ctx_factory()
    fps: dict[str, str] = {}
    previous = ""
    for stage in stages:
        module = importlib.import_module(stage.module)
        extra = module.input_fingerprint(ctx) if hasattr(module, "input_fingerprint") else None
        previous = fingerprint(stage.name, section_values(ctx.recipe, stage.sections), previous, extra)
        fps[stage.name] = previous
    return fps


def select(until: str | None, only: str | None, start: str | None = None) -> tuple[Stage, ...]:
    """The stages to run: just `only`, or from `start` (default the first) through `until` (default the last)."""
    names = [s.name for s in STAGE_TABLE]
    if only:
        return (STAGE_TABLE[names.index(only)],)
    begin = names.index(start) if start else 0
    end = names.index(until) + 1 if until else len(names)
    return STAGE_TABLE[begin:end]


@dataclass
class Plan:
    """What `run` will do: each stage with its fingerprint and whether it runs or is skipped."""

    steps: list[tuple[Stage, str, str]]  # (stage, fingerprint, "run" | "skip")
    conflicts: list[str]


def make_plan(recipe: Recipe, run: RunDir, manifest: Manifest, console: Any,
              until: str | None = None, only: str | None = None, force: bool = False,
              start: str | None = None) -> Plan:
    fps = stage_fingerprints(lambda: StageContext(recipe, run, manifest, console), STAGE_TABLE)
    steps, conflicts = [], []
    for stage in select(until, only, start):
        fp = fps[stage.name]
        entry = manifest.stage(stage.name)
        if manifest.is_done(stage.name, fp) and not (force and only):
            steps.append((stage, fp, "skip"))
            continue
        if entry.get("status") == "done" and not force:
            conflicts.append(stage.name)
        steps.append((stage, fp, "run"))
    if only:
        names = [s.name for s in STAGE_TABLE]
        for upstream in STAGE_TABLE[: names.index(only)]:
            if not manifest.is_done(upstream.name, fps[upstream.name]):
                raise CptKitError(f"stage {only!r} needs {upstream.name!r}, which is not done for this recipe",
                                  where=str(run.root), hint=f"run with --until {only} instead of --stage {only}")
    return Plan(steps, conflicts)


def check_run_dir(recipe: Recipe, run: RunDir, manifest: Manifest, plan: Plan, force: bool) -> None:
    """Refuse to overwrite another recipe's run, or finished outputs, unless --force."""
    if force:
        return
    root = run.root
    if root.exists() and any(root.iterdir()) and not run.manifest.exists():
        raise CptKitError(f"{root} exists, is not empty and is not a cpt-kit run", where=str(root),
                          hint="choose another --output-dir, or pass --force to write into it")
    old_name = manifest.data.get("recipe", {}).get("name")
    if old_name and old_name != recipe.name:
        raise CptKitError(f"{root} holds the run of recipe {old_name!r}, not {recipe.name!r}", where=str(root),
                          hint="choose another --output-dir, or pass --force to overwrite it")
    if plan.conflicts:
        changed = _changed_keys(manifest.data.get("recipe", {}), recipe.to_dict())
        raise CptKitError(
            f"the recipe changed since stages {', '.join(plan.conflicts)} finished"
            + (f" (changed: {', '.join(changed[:8])})" if changed else ""),
            where=str(root), hint="pass --force to redo them (their outputs are replaced), or use another --output-dir")


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [k for key in keys for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def run_pipeline(recipe: Recipe, run: RunDir, console: Any, *, until: str | None = None,
                 only: str | None = None, force: bool = False, notes: list[str] | None = None,
                 start: str | None = None) -> Manifest:
    """Execute the planned stages (from `start`, e.g. "merge" for `cpt-kit export`); returns the manifest."""
    manifest = Manifest.load(run.manifest)
    plan = make_plan(recipe, run, manifest, console, until, only, force, start)
    check_run_dir(recipe, run, manifest, plan, force)
    run.root.mkdir(parents=True, exist_ok=True)
    manifest.data.update(recipe=recipe.to_dict(), versions=library_versions(), notes=list(notes or []))
    manifest.save()
    for stage, fp, action in plan.steps:
        if action == "skip":
            console.print(f"[dim]- {stage.name}: done already (fingerprint {fp}), skipped[/dim]")
            continue
        previous = manifest.stage(stage.name)
        resume = previous.get("fingerprint") == fp and previous.get("status") in ("running", "failed")
        ctx = StageContext(recipe, run, manifest, console, fp, resume, list(notes or []))
        console.rule(f"[bold]{stage.name}")
        manifest.start(stage.name, fp)
        started = time.perf_counter()
        try:
            metrics = importlib.import_module(stage.module).run(ctx)
        except BaseException as exc:
            message = exc.render() if isinstance(exc, CptKitError) else f"{type(exc).__name__}: {exc}"
            manifest.fail(stage.name, message, time.perf_counter() - started)
            if not isinstance(exc, CptKitError):
                atomic_write_text(run.logs / "error.log", traceback.format_exc())
            raise
        manifest.finish(stage.name, metrics or {}, time.perf_counter() - started)
        _mark_downstream_stale(manifest, stage.name, {s.name for s, _, _ in plan.steps})
    return manifest


def _mark_downstream_stale(manifest: Manifest, name: str, planned: set[str]) -> None:
    """A stage that ran again (e.g. `--stage train --force`) makes the finished stages after it,
    which this run does not redo, out of date: mark them stale so the next run redoes them."""
    names = [s.name for s in STAGE_TABLE]
    changed = False
    for later in names[names.index(name) + 1:]:
        entry = manifest.stage(later)
        if later not in planned and entry.get("status") == "done":
            entry["status"] = "stale"
            entry["stale_because"] = f"{name} ran again after it"
            changed = True
    if changed:
        manifest.save()


def describe_plan(plan: Plan) -> list[str]:
    lines = []
    for stage, fp, action in plan.steps:
        verb = "run " if action == "run" else "skip"
        lines.append(f"{verb} {stage.name:<10} fingerprint {fp}")
    return lines


def default_run_dir(recipe: Recipe, output_dir: str | Path | None) -> RunDir:
    return RunDir(Path(output_dir) if output_dir else Path("runs") / recipe.name)
