"""Runs the stages of a recipe in order into a run directory, redoing only what changed.

STAGE_TABLE lists the stages. Each `Stage` declares the recipe fields it reads (`reads`, dotted
keys; a section name covers all its fields), the run files of earlier stages it reads (`inputs`)
and the run files it writes (`outputs`), as paths relative to the run directory (a directory
means every file below it). A stage module has `run(ctx: StageContext) -> dict` (its metrics) and
may have `input_fingerprint(ctx)` for what it reads outside the run (see cpt_kit.plan). When a
stage finishes, the files it wrote under its outputs are recorded in the manifest (size + content
hash); see docs/stage-contracts.md.
"""

from __future__ import annotations

import errno
import importlib
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpt_kit.errors import CptKitError
from cpt_kit.file_records import file_record, files_under, stat_keys
from cpt_kit.manifest import Manifest, library_versions
from cpt_kit.plan import Plan, assess, dependents, plan_stages
from cpt_kit.recipe import Recipe
from cpt_kit.rundir import RunDir, atomic_write_text, refuse_foreign_dir, remove_stale_partials
from cpt_kit.run_lock import run_lock


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    reads: tuple[str, ...] = ()
    """Recipe fields (dotted keys) the stage reads; a section name ("data") covers all its fields."""
    inputs: tuple[str, ...] = ()
    """Run files/directories written by earlier stages that the stage reads (relative to the run)."""
    outputs: tuple[str, ...] = ()
    """Run files/directories the stage writes (relative to the run); it must write them on every run."""


MODEL_LOADING = ("model.base", "model.revision", "model.trust_remote_code", "model.hf_token_env")
DATA_FILES = ("data/train", "data/heldout", "data/replay_heldout", "data/heldout_texts.jsonl", "data/tokenizer",
              "data/tokenizer_extension.json", "data/stats.json", "data/chat_template.json")
GGUF_NAMES = ("name", "export.outtype", "export.quantizations")

STAGE_TABLE: tuple[Stage, ...] = (
    Stage("prepare", "cpt_kit.data.prepare", reads=(*MODEL_LOADING, "model.tokenizer", "model.max_seq_length", "data",
                                                    "train.objective", "sft"),
          outputs=DATA_FILES),
    Stage("train", "cpt_kit.train.stage", reads=("model", "lora", "train"),
          inputs=("data/train", "data/heldout", "data/tokenizer", "data/tokenizer_extension.json"), outputs=("adapter",)),
    Stage("evaluate", "cpt_kit.evaluate", reads=(*MODEL_LOADING, "eval.prompts", "eval.max_new_tokens", "eval.max_blocks"),
          inputs=("adapter", "data/heldout", "data/replay_heldout", "data/tokenizer_extension.json"),
          outputs=("eval/perplexity.json", "eval/samples.json")),
    Stage("merge", "cpt_kit.export.merge_stage", reads=MODEL_LOADING,
          inputs=("adapter", "data/tokenizer", "data/heldout_texts.jsonl"), outputs=("merged",)),
    Stage("compare", "cpt_kit.compare",
          reads=(*MODEL_LOADING, "name", "train.objective", "eval.prompts", "eval.max_new_tokens",
                 "export.modelfile.system", "sft.system_prompt"),
          inputs=("merged",), outputs=("eval/comparison.json", "eval/comparison.md")),
    Stage("gguf", "cpt_kit.export.gguf_stage",
          reads=(*GGUF_NAMES, "export.token_embedding_type", "export.output_tensor_type", "export.imatrix",
                 "export.imatrix_tokens", "export.quant_max_ppl_delta", "export.quant_max_kl", "eval.max_blocks",
                 "model.max_seq_length"),
          # gguf/quality.json: each quantization gated on the blocks verify uses (data/heldout or probe texts)
          inputs=("merged", "data/train", "data/tokenizer", "data/heldout", "data/heldout_texts.jsonl"),
          outputs=("gguf",)),
    Stage("modelfile", "cpt_kit.export.modelfile_stage",
          reads=(*GGUF_NAMES, *MODEL_LOADING, "model.max_seq_length", "export.modelfile", "export.modelfile_quant",
                 "export.adapter_modelfile", "train.objective", "sft.system_prompt"),
          inputs=("gguf", "merged", "data/tokenizer", "adapter"), outputs=("ollama",)),
    Stage("verify", "cpt_kit.export.verify_stage",
          reads=(*GGUF_NAMES, "export.max_f16_ppl_delta", "eval.max_blocks", "model.max_seq_length",
                 "train.objective"),
          inputs=("gguf", "merged", "data/heldout", "data/heldout_texts.jsonl", "ollama"), outputs=("verify.json",)),
    Stage("safety", "cpt_kit.safety.stage",
          reads=(*GGUF_NAMES, "export.modelfile_quant", "model.max_seq_length", "train.objective", "safety"),
          inputs=("merged", "gguf", "ollama", "data/tokenizer"), outputs=("safety.json",)),
    # the report reads the manifest's recipe and metrics, not the recipe object: it declares the files
    # ("eval" covers compare's eval/comparison.md, which the report names)
    Stage("report", "cpt_kit.report",
          inputs=("data/stats.json", "logs/train.jsonl", "eval", "verify.json", "safety.json", "ollama"),
          outputs=("report.md", "report.html", "report")),
)
STAGES = tuple(s.name for s in STAGE_TABLE)


@dataclass
class StageContext:
    """What a stage gets: the recipe, the run's paths, the manifest, a console, and its fingerprint."""

    recipe: Recipe
    run: RunDir
    manifest: Manifest
    console: Any
    fingerprint: str = ""
    resume: bool = False
    """True when the same stage (same fingerprint) ran before and is not forced: continue from its
    working files (train: the last complete checkpoint), whether it was interrupted or lost an output."""
    notes: list[str] = field(default_factory=list)

    def log(self, message: str) -> None:
        self.console.print(f"  {message}")

    @property
    def hardware(self):
        from cpt_kit.hardware import detect
        if not hasattr(self, "_hardware"):
            self._hardware = detect()
        return self._hardware


def select(until: str | None, only: str | None, start: str | None = None) -> tuple[Stage, ...]:
    """The stages to run: just `only`, or from `start` (default the first) through `until` (default the last)."""
    names = [s.name for s in STAGE_TABLE]
    if only:
        return (STAGE_TABLE[names.index(only)],)
    begin = names.index(start) if start else 0
    end = names.index(until) + 1 if until else len(names)
    return STAGE_TABLE[begin:end]


def make_plan(recipe: Recipe, run: RunDir, manifest: Manifest, console: Any,
              until: str | None = None, only: str | None = None, force: bool = False,
              start: str | None = None) -> Plan:
    """Which of the selected stages run and why (see cpt_kit.plan)."""
    return plan_stages(StageContext(recipe, run, manifest, console), STAGE_TABLE, select(until, only, start),
                       only, force)


def check_run_dir(recipe: Recipe, run: RunDir, manifest: Manifest, plan: Plan, force: bool) -> None:
    """Refuse to overwrite another recipe's run, or finished outputs, unless --force."""
    if force:
        return
    root = run.root
    check_recipe_name(recipe, run, manifest)
    if plan.conflicts:
        why = "; ".join(f"{s.stage.name}: {', '.join(s.reasons)}" for s in plan.steps if s.needs_force)
        raise CptKitError(f"finished stages would be redone ({why})", where=str(root),
                          hint="pass --force to redo them (their outputs are replaced), or use another --output-dir")


def check_recipe_name(recipe: Recipe, run: RunDir, manifest: Manifest) -> None:
    """Refuse a run directory that holds another recipe's run (--force skips this check)."""
    old_name = manifest.data.get("recipe", {}).get("name")
    if old_name and old_name != recipe.name:
        raise CptKitError(f"{run.root} holds the run of recipe {old_name!r}, not {recipe.name!r}", where=str(run.root),
                          hint="choose another --output-dir, or pass --force to redo its stages for this recipe")


def run_pipeline(recipe: Recipe, run: RunDir, console: Any, *, until: str | None = None,
                 only: str | None = None, force: bool = False, notes: list[str] | None = None,
                 start: str | None = None) -> Manifest:
    """Execute the planned stages (from `start`, e.g. "merge" for `cpt-kit export`) holding the run's
    lock; returns the manifest. A directory that is not a cpt-kit run is refused, whatever the flags."""
    refuse_foreign_dir(run)
    with run_lock(run.root, log=lambda text: console.print(f"[yellow]{text}[/yellow]")):
        manifest = Manifest.load(run.manifest)
        plan = make_plan(recipe, run, manifest, console, until, only, force, start)
        check_run_dir(recipe, run, manifest, plan, force)
        removed = remove_stale_partials(run.root)
        if removed:
            console.print(f"[dim]removed unfinished files of an interrupted run: {', '.join(removed)}[/dim]")
        manifest.data.update(recipe=recipe.to_dict(), versions=library_versions(), notes=list(notes or []))
        manifest.save()
        for step in plan.steps:
            stage = step.stage
            ctx = StageContext(recipe, run, manifest, console, notes=list(notes or []))
            found = assess(stage, ctx)  # again: a stage that ran just now may have rewritten its inputs
            fp = found.basis.fingerprint
            if not found.reasons and not (only and force):
                console.print(f"[dim]- {stage.name}: done already (fingerprint {fp}), skipped[/dim]")
                continue
            previous = manifest.stage(stage.name)
            ctx.fingerprint = fp
            # same fingerprint: same fields and inputs, so its working files (checkpoints) are still
            # valid, whether it was interrupted or finished and lost an output; not for --stage --force
            ctx.resume = previous.get("fingerprint") == fp and bool(found.reasons)
            console.rule(f"[bold]{stage.name}")
            if found.reasons:
                console.print(f"[dim]  runs because: {'; '.join(found.reasons)}[/dim]")
            _run_stage(stage, ctx, found.basis.to_json(), previous)
            _mark_dependents_stale(manifest, stage, {s.stage.name for s in plan.steps})
    return manifest


def run_one_stage(recipe: Recipe, run: RunDir, console: Any, name: str,
                  after_failure_of: str | None = None) -> Manifest:
    """Run stage `name` now, whatever the state of the stages before it (`cpt-kit report` on a run
    that failed half way): under the run's lock, with its outputs recorded like any stage's.

    `after_failure_of`: the stage whose failure just ended the run (the CLI writes the report of a
    failed run). A crash of this stage then leaves that failure's logs/error.log alone (its traceback
    goes to logs/<name>-error.log), and the stage is marked stale, so that the run's next invocation
    writes it again once the failure is fixed."""
    refuse_foreign_dir(run)
    with run_lock(run.root, log=lambda text: console.print(f"[yellow]{text}[/yellow]")):
        manifest = Manifest.load(run.manifest)
        stage = STAGE_TABLE[STAGES.index(name)]
        ctx = StageContext(recipe, run, manifest, console)
        found = assess(stage, ctx)
        ctx.fingerprint = found.basis.fingerprint
        _run_stage(stage, ctx, found.basis.to_json(), manifest.stage(name),
                   error_log=f"{name}-error.log" if after_failure_of else "error.log")
        if after_failure_of:
            manifest.stage(name).update(status="stale", stale_because=f"written while the run had failed at "
                                                                      f"{after_failure_of}")
            manifest.save()
    return manifest


def _run_stage(stage: Stage, ctx: StageContext, basis: dict, previous: dict, error_log: str = "error.log") -> None:
    """Run one stage; on success record the files it wrote under its outputs (and remove the files an
    earlier run of it recorded that it did not write again, when they are still as recorded). On failure
    the error names the stage (`failed_stage`) and a crash's traceback goes to logs/<error_log>."""
    run, manifest = ctx.run, ctx.manifest
    refuse_unrecorded_outputs(stage, previous, run.root)
    manifest.start(stage.name, ctx.fingerprint, basis)
    before = stat_keys(run.root, stage.outputs)
    started = time.perf_counter()
    try:
        metrics = importlib.import_module(stage.module).run(ctx)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            _record_crash(stage, ctx, exc, started, error_log)
            raise
        full = CptKitError(f"the disk is full: {stage.name} could not write {exc.filename or 'its outputs'}",
                           where=str(run.root), hint="free some space and run the same command again (finished "
                                                     "stages are kept; this stage's earlier outputs were not touched)")
        manifest.fail(stage.name, full.render(), time.perf_counter() - started)
        full.failed_stage = stage.name
        raise full from None
    except BaseException as exc:
        _record_crash(stage, ctx, exc, started, error_log)
        raise
    written = sorted(rel for rel, key in stat_keys(run.root, stage.outputs).items() if before.get(rel) != key)
    if stage.outputs and not written:
        raise CptKitError(f"stage {stage.name!r} finished without writing any of {', '.join(stage.outputs)}",
                          where=stage.module, hint="this is a bug in the stage; please report it")
    remove_earlier_outputs(stage.name, previous, written, run.root, ctx.log)
    outputs = {rel: file_record(run.root / rel) for rel in written}
    manifest.finish(stage.name, metrics or {}, time.perf_counter() - started, outputs)


def remove_earlier_outputs(name: str, previous: dict, written: list[str], root: Path, log) -> None:
    """Remove the files an earlier run of stage `name` recorded and this one did not write again, when
    they are still as recorded (a file changed since is someone's: it stays)."""
    for rel, record in previous.get("outputs", {}).items():
        path = root / rel
        if rel not in written and path.is_file() and file_record(path) == record:
            path.unlink()
            log(f"removed {rel} (written by an earlier run of {name}, not by this one)")


def _record_crash(stage: Stage, ctx: StageContext, exc: BaseException, started: float, error_log: str) -> None:
    """A failed stage: its error in the manifest and its name on the error (the CLI reports a run that
    failed after prepare); for a bug (not a CptKitError) the traceback in logs/<error_log>."""
    message = exc.render() if isinstance(exc, CptKitError) else f"{type(exc).__name__}: {exc}"
    ctx.manifest.fail(stage.name, message, time.perf_counter() - started)
    exc.failed_stage = stage.name
    if not isinstance(exc, CptKitError):
        atomic_write_text(ctx.run.logs / error_log, traceback.format_exc())
        exc.error_log = ctx.run.logs / error_log  # the CLI names it


def refuse_unrecorded_outputs(stage: Stage, entry: dict, root: Path) -> None:
    """Stop before `stage` writes when its output paths hold files this run did not write (the user's),
    naming them: a stage never replaces or deletes them."""
    unrecorded = unrecorded_outputs(stage, entry, root)
    if unrecorded:
        raise CptKitError(f"stage {stage.name!r} would replace files this run did not write: "
                          f"{', '.join(unrecorded[:5])}" + (f" (+{len(unrecorded) - 5} more)" if len(unrecorded) > 5 else ""),
                          where=str(root), hint=f"move them out of {', '.join(stage.outputs)} (those paths hold "
                                                "what cpt-kit writes), then run again")


def unrecorded_outputs(stage: Stage, entry: dict, root: Path) -> list[str]:
    """Files under the stage's output paths that this run did not write (the stage could replace them):
    neither recorded when it last finished nor written by its unfinished attempts since then."""
    if entry.get("status") in ("done", "stale", "external") and "outputs" not in entry:
        return []  # finished under a cpt-kit that did not record outputs
    recorded = entry.get("outputs", {})
    since = entry.get("unfinished_since", float("inf")) - 1.0
    return [rel for rel in files_under(root, stage.outputs)
            if rel not in recorded and os.stat(root / rel).st_ctime < since]


def _mark_dependents_stale(manifest: Manifest, stage: Stage, planned: set[str]) -> None:
    """A stage that ran again (e.g. `--stage train --force`) makes the finished stages that depend on
    it, and that this run does not redo, out of date: mark them stale so the next run redoes them."""
    changed = False
    for later in dependents(stage, STAGE_TABLE):
        entry = manifest.stage(later.name)
        if later.name not in planned and entry.get("status") == "done":
            entry["status"] = "stale"
            entry["stale_because"] = f"{stage.name} ran again after it"
            changed = True
    if changed:
        manifest.save()


def default_run_dir(recipe: Recipe, output_dir: str | Path | None) -> RunDir:
    return RunDir(Path(output_dir) if output_dir else Path("runs") / recipe.name)
