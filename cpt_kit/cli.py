"""`cpt-kit` command line. Heavy libraries are imported inside the commands that need them."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click

from cpt_kit.errors import CptKitError
from cpt_kit.pipeline import STAGES

STAGE_CHOICE = click.Choice(STAGES)
EXPORT_STAGES = click.Choice(STAGES[STAGES.index("merge"):])


def _console():
    from rich.console import Console
    return Console(highlight=False)


def _load(recipe_path: str, overrides: tuple[str, ...]):
    from cpt_kit.recipe import apply_overrides, load_recipe
    return apply_overrides(load_recipe(recipe_path), overrides)


def _quiet_library_loggers() -> None:
    """Import-time warnings that say nothing to a cpt-kit user (optional kernels that CPU torch
    lacks, a torch deprecation inside torchao) are kept out of the run's output."""
    import logging
    for name in ("bitsandbytes", "torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


class _Group(click.Group):
    """Prints CptKitError as a short message (what, where, what to do) and exits 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CptKitError as exc:
            click.echo(click.style("error: ", fg="red", bold=True) + exc.render(), err=True)
            sys.exit(2)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except Exception as exc:  # a bug, not bad input: short message, full traceback in a log file
            click.echo(click.style("internal error: ", fg="red", bold=True) + f"{type(exc).__name__}: {exc}\n"
                       f"  -> the full traceback is in {_traceback_file(exc)}; please report it", err=True)
            sys.exit(1)


def _traceback_file(exc: BaseException) -> str:
    """The run's logs/error.log when the pipeline wrote one for `exc`, else a new temporary file."""
    import tempfile
    import traceback

    if getattr(exc, "error_log", None):
        return str(exc.error_log)
    fd, path = tempfile.mkstemp(prefix="cpt-kit-error-", suffix=".log")
    with open(fd, "w", encoding="utf-8") as handle:
        handle.write("".join(traceback.format_exception(exc)))
    return path


def _run_and_report(console, run, call, report_on_failure: bool) -> None:
    """Run `call()` (the pipeline) and print the summary; a failure is printed first, and the summary
    of a failed run offers no next step. When the run would have ended with the report stage
    (`report_on_failure`) and a stage after prepare failed, the report is still written, marked as a
    failed run; the command still ends with the stage's error and exit status."""
    from cpt_kit.manifest import Manifest
    from cpt_kit.run_lock import RunDirectoryBusy
    from cpt_kit.summary import print_summary

    try:
        manifest = call()
    except CptKitError as exc:
        click.echo(click.style("error: ", fg="red", bold=True) + exc.render(), err=True)
        if report_on_failure:
            _report_failed_run(console, run, exc)
        with contextlib.suppress(CptKitError):  # an unreadable manifest: the error above says so
            # the state of a run another process is working on is its own to report
            if run.manifest.exists() and not isinstance(exc, RunDirectoryBusy):
                print_summary(console, run, Manifest.load(run.manifest), failed=True)
        sys.exit(2)
    except Exception as exc:  # a bug: reported by _Group, after the report of the failed run
        if report_on_failure:
            _report_failed_run(console, run, exc)
        raise
    print_summary(console, run, manifest)


def _report_failed_run(console, run, exc: BaseException) -> None:
    """Write the report of a run whose stage after prepare failed with `exc` (what the stages before it
    measured: e.g. the safety pass rates of a failed gate). A failure of the report itself is a note:
    it never replaces the stage's error."""
    from cpt_kit.export.from_adapter import recipe_of_run
    from cpt_kit.pipeline import run_one_stage

    failed = getattr(exc, "failed_stage", None)
    if failed in (None, "prepare", "report"):  # not a stage's failure (e.g. a refusal), or nothing to report yet
        return
    try:
        run_one_stage(recipe_of_run(run.root), run, console, "report", after_failure_of=failed)
    except Exception as report_exc:
        problem = report_exc.render() if isinstance(report_exc, CptKitError) else \
            f"{type(report_exc).__name__}: {report_exc}"
        log = getattr(report_exc, "error_log", None)
        click.echo(click.style("note: ", fg="yellow", bold=True) + f"the report of this failed run could not be "
                   f"written: {problem}" + (f" (traceback in {log})" if log else ""), err=True)
        return
    console.print(f"report of the failed run: {run.root / 'report.md'}")


@click.group(cls=_Group)
@click.version_option(package_name="cpt-kit")
def main() -> None:
    """Continued pretraining recipes on Unsloth, exported to GGUF and Ollama."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe field, e.g. train.learning_rate=1e-4.")
@click.option("--until", type=STAGE_CHOICE, help="Stop after this stage.")
@click.option("--stage", "only", type=STAGE_CHOICE, help="Run only this stage (earlier ones must be done).")
@click.option("--dry-run", is_flag=True, help="Validate the recipe and print the plan; load no model.")
@click.option("--output-dir", type=click.Path(file_okay=False), help="Run directory (default runs/<name>).")
@click.option("--force", is_flag=True, help="Redo finished stages / write into a run of another recipe.")
@click.option("--skip-plan-check", is_flag=True, help="Start even when `cpt-kit plan` says the run will not fit this GPU.")
def run(recipe, overrides, until, only, dry_run, output_dir, force, skip_plan_check):
    """Run RECIPE (a .py file defining RECIPE) through prepare -> train -> evaluate -> export."""
    from cpt_kit.hardware import check_recipe_against_hardware, detect
    from cpt_kit.model_source import check_base
    from cpt_kit.manifest import Manifest
    from cpt_kit.pipeline import default_run_dir, make_plan, run_pipeline
    from cpt_kit.plan import describe_plan
    from cpt_kit.rundir import refuse_foreign_dir

    if until and only:
        raise click.UsageError("use either --until or --stage, not both")
    console = _console()
    resolved = _load(recipe, overrides)
    check_base(resolved.model)  # before a run directory exists
    hardware = detect()
    notes = check_recipe_against_hardware(resolved, hardware)
    run_dir = default_run_dir(resolved, output_dir)
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    refuse_foreign_dir(run_dir)  # before any work, whatever the flags
    if not skip_plan_check and "prepare" not in (until, only):  # what must fit is training
        from cpt_kit.planner import check_fits_this_gpu
        gpu_check = check_fits_this_gpu(resolved, run_dir.root)  # raises when it will not fit this GPU
        if gpu_check and gpu_check.warning:
            console.print(f"[yellow]warning:[/yellow] {gpu_check.text}", soft_wrap=True)
        elif gpu_check:
            console.print(f"[dim]{gpu_check.text}[/dim]")
    if dry_run:
        manifest = Manifest.load(run_dir.manifest)
        plan = make_plan(resolved, run_dir, manifest, console, until, only, force)
        console.print(f"recipe {resolved.name!r} is valid; run directory {run_dir.root}")
        for line in describe_plan(plan):
            console.print("  " + line)
        if plan.conflicts:
            console.print(f"[yellow]would need --force to redo: {', '.join(plan.conflicts)}[/yellow]")
        return
    from cpt_kit.train.backend import preload
    _quiet_library_loggers()
    preload(resolved.train.backend, hardware.device)  # Unsloth must patch transformers before anything imports it
    _run_and_report(console, run_dir, lambda: run_pipeline(resolved, run_dir, console, until=until, only=only,
                                                           force=force, notes=notes),
                    report_on_failure=only is None and until in (None, "report"))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe field.")
@click.option("--docs", is_flag=True, help="Show each field's description too.")
def show(recipe, overrides, docs):
    """Print the resolved RECIPE (after --set overrides)."""
    import dataclasses

    from rich.tree import Tree

    from cpt_kit.recipe import field_docs

    resolved = _load(recipe, overrides)

    def add(node, obj):
        descriptions = field_docs(type(obj)) if docs else {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            doc = f"  [dim]# {descriptions[f.name]}[/dim]" if f.name in descriptions else ""
            if dataclasses.is_dataclass(value):
                add(node.add(f"[bold]{f.name}[/bold]{doc}"), value)
            else:
                node.add(f"{f.name} = {value!r}{doc}")

    tree = Tree(f"[bold]Recipe[/bold] {resolved.name!r}  ({Path(recipe)})")
    add(tree, resolved)
    _console().print(tree)


@main.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--adapter", type=click.Path(file_okay=False, exists=True), help="A plain PEFT adapter directory (instead of RUN_DIR).")
@click.option("--base", help="Base model of --adapter: hub id or local directory (default: the adapter's base_model_name_or_path).")
@click.option("--output-dir", type=click.Path(file_okay=False), help="Run directory for --adapter (default runs/<name>).")
@click.option("--name", help="Name of the exported model (with --adapter; default: the adapter directory's name).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe field, e.g. export.quantizations=Q8_0.")
@click.option("--until", type=EXPORT_STAGES, help="Stop after this stage.")
@click.option("--force", is_flag=True, help="Redo finished export stages.")
def export(run_dir, adapter, base, output_dir, name, overrides, until, force):
    """Merge -> GGUF -> Modelfile -> verify for an existing RUN_DIR, or for --adapter DIR --base BASE."""
    from cpt_kit.export.from_adapter import prepare_adapter_run, recipe_for_adapter, recipe_of_run
    from cpt_kit.model_source import check_base
    from cpt_kit.pipeline import default_run_dir, run_pipeline
    from cpt_kit.run_lock import run_lock
    from cpt_kit.rundir import RunDir, refuse_foreign_dir

    if bool(run_dir) == bool(adapter):
        raise click.UsageError("give either RUN_DIR or --adapter DIR (with --base)")
    if run_dir and (base or output_dir or name):
        raise click.UsageError("--base, --output-dir and --name go with --adapter")
    console = _console()
    if run_dir:
        run = RunDir(Path(run_dir))
        resolved = recipe_of_run(run.root, overrides)
    else:
        resolved = recipe_for_adapter(Path(adapter), base, name or Path(adapter).resolve().name, overrides)
        run = default_run_dir(resolved, output_dir)
    check_base(resolved.model)  # before a run directory exists
    _quiet_library_loggers()

    def export_run():
        refuse_foreign_dir(run)
        with run_lock(run.root, log=lambda text: console.print(f"[yellow]{text}[/yellow]")):
            if adapter:  # the adapter is copied in under the lock: no other run sees it half-copied
                prepare_adapter_run(Path(adapter), resolved, run, force)
            return run_pipeline(resolved, run, console, until=until, force=force, start="merge")

    _run_and_report(console, run, export_run, report_on_failure=until in (None, "report"))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--gpu", "device_key", type=click.Choice(["t4", "l4", "a10g", "a100-40gb", "a100-80gb", "h100", "cpu"]),
              help="Device to plan for (default: this machine's GPU, else a Colab T4).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe field.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True),
              help="The base model's config.json, when it is neither local nor in the planner's table.")
@click.option("--output-dir", type=click.Path(file_okay=False), help="Run directory (its prepared corpus sizes the time).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(recipe, device_key, overrides, config_path, output_dir, as_json):
    """Estimate peak memory and training time of RECIPE on a device, from the model config only."""
    import json

    from cpt_kit.pipeline import default_run_dir
    from cpt_kit.planner import describe, plan_recipe
    from cpt_kit.planner.gpus import detected_device, device
    from cpt_kit.planner.shapes import read_config

    resolved = _load(recipe, overrides)
    target = device(device_key) if device_key else (detected_device() or device("t4"))
    shape = read_config(Path(config_path)) if config_path else None
    result = plan_recipe(resolved, target, shape=shape, run_dir=default_run_dir(resolved, output_dir).root)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    console = _console()
    for line in describe(result):
        console.print(line, soft_wrap=True)  # advice lines stay one line, ready to paste
    if not result.fits:
        sys.exit(3)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
def report(run_dir):
    """(Re)write RUN_DIR/report.md, report.html and report/*.png from the run's files alone."""
    from cpt_kit.export.from_adapter import recipe_of_run
    from cpt_kit.pipeline import run_one_stage
    from cpt_kit.rundir import RunDir

    run = RunDir(Path(run_dir))
    console = _console()
    run_one_stage(recipe_of_run(run.root), run, console, "report")
    console.print(f"wrote {run.root / 'report.md'}, {run.root / 'report.html'} and {run.root / 'report'}/")


if __name__ == "__main__":
    main()
