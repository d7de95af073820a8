"""`cpt-kit export`: the recipe of an existing run, or a new run around a plain PEFT adapter + base.

A plain adapter gets a run directory with the adapter's files copied into `adapter/`, a recipe
built from its adapter_config.json (r, lora_alpha, rsLoRA, target modules), `adapter/cpt_kit_train.json`
naming the base, and the stages before merge recorded in the manifest as external (the train stage
with the copied files as its outputs). A directory whose adapter cpt-kit trained is never written into.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable, Optional

from cpt_kit.errors import CptKitError
from cpt_kit.manifest import Manifest
from cpt_kit.recipe import Lora, Model, Recipe, Train, apply_overrides, recipe_from_dict
from cpt_kit.rundir import RunDir, atomic_entries, atomic_write_json



def recipe_of_run(run_dir: Path, overrides: Iterable[str] = ()) -> Recipe:
    manifest = Manifest.load(Path(run_dir) / "manifest.json")
    if "recipe" not in manifest.data:
        raise CptKitError(f"{run_dir} is not a cpt-kit run (no manifest.json with a recipe)", where=str(run_dir),
                          hint="for a plain PEFT adapter use: cpt-kit export --adapter DIR --base BASE --output-dir OUT")
    return apply_overrides(recipe_from_dict(manifest.data["recipe"]), overrides)


def recipe_for_adapter(adapter_dir: Path, base: Optional[str], name: str, overrides: Iterable[str] = ()) -> Recipe:
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise CptKitError(f"{adapter_dir} is not a PEFT adapter (no adapter_config.json)", where=str(adapter_dir))
    config = json.loads(config_file.read_text())
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise CptKitError("the adapter does not name its base model", where=str(config_file), hint="pass --base")
    targets = config.get("target_modules")
    full_modules = bool(config.get("modules_to_save"))
    lora = Lora(r=int(config.get("r", 8)), lora_alpha=int(config.get("lora_alpha", 8)),
                use_rslora=bool(config.get("use_rslora")), train_embeddings=full_modules,
                # saved as names ("q_proj") or, for "all-linear", as full module paths: keep the layer names
                target_modules=tuple(sorted({t.rsplit(".", 1)[-1] for t in targets}))
                if isinstance(targets, list) and targets else Lora().target_modules)
    train = Train(embedding_learning_rate=Train().embedding_learning_rate if full_modules else None)
    return apply_overrides(Recipe(name=name, model=Model(base=base, load_in_4bit=False), lora=lora, train=train),
                           overrides)


def _same_files(source: Path, copy: Path) -> bool:
    import filecmp
    return copy.is_dir() and all((copy / p.name).is_file() and filecmp.cmp(p, copy / p.name, shallow=False)
                                 for p in _adapter_files(source) if p.name != "cpt_kit_train.json")


def _adapter_files(adapter_dir: Path) -> list[Path]:
    """The adapter's own files: those at the top of its folder (adapter_config.json, the weights, the
    tokenizer); sub-folders (a trainer's checkpoints) are not part of it."""
    return sorted(p for p in Path(adapter_dir).iterdir() if p.is_file())


def check_adapter_run(recipe: Recipe, run: RunDir, manifest: Manifest, force: bool) -> None:
    """Before anything is copied: `run` is new or an earlier `export --adapter` run (never a run whose
    adapter cpt-kit trained, whatever the flags), of this recipe name (unless --force)."""
    from cpt_kit.pipeline import check_recipe_name

    status = manifest.stage("train").get("status")
    if status not in (None, "external"):
        name = manifest.data.get("recipe", {}).get("name", "?")
        raise CptKitError(f"{run.root} holds the run of recipe {name!r}, whose adapter cpt-kit trained (train stage "
                          f"{status}): export --adapter would replace it", where=str(run.root),
                          hint=f"export that run's own adapter with `cpt-kit export {run.root}`, or give this adapter "
                               "another --output-dir")
    if not force:
        check_recipe_name(recipe, run, manifest)


def prepare_adapter_run(adapter_dir: Path, recipe: Recipe, run: RunDir, force: bool = False) -> None:
    """Check the run directory (check_adapter_run), then copy the adapter's files into adapter/ (only
    those: anything else there stays) and record the earlier stages as external, the copied files as
    the train stage's outputs (idempotent). The caller has checked that `run` is a run directory (or
    new) and holds its lock."""
    from cpt_kit.file_records import file_record
    from cpt_kit.pipeline import STAGE_TABLE, STAGES, refuse_unrecorded_outputs, remove_earlier_outputs

    adapter_dir = Path(adapter_dir).resolve()
    manifest = Manifest.load(run.manifest)
    check_adapter_run(recipe, run, manifest, force)
    train = manifest.stage("train")
    if run.adapter.resolve() != adapter_dir and not _same_files(adapter_dir, run.adapter):
        refuse_unrecorded_outputs(STAGE_TABLE[STAGES.index("train")], train, run.root)
        with atomic_entries(run.adapter) as tmp:  # replaces the adapter's files, nothing else there
            for item in _adapter_files(adapter_dir):
                shutil.copyfile(item, tmp / item.name)
            info = tmp / "cpt_kit_train.json"
            data = json.loads(info.read_text()) if info.is_file() else {}
            data.update(base=recipe.model.base, external=True, source=str(adapter_dir))
            atomic_write_json(info, data)
            written = sorted(f"{run.adapter.name}/{p.name}" for p in tmp.iterdir())
        remove_earlier_outputs("train", train, written, run.root, lambda text: None)
        manifest.data["stages"]["train"] = {"status": "external", "source": str(adapter_dir),
                                            "outputs": {rel: file_record(run.root / rel) for rel in written}}
    for stage in STAGES[: STAGES.index("merge")]:
        manifest.data["stages"].setdefault(stage, {"status": "external", "source": str(adapter_dir)})
    manifest.save()
