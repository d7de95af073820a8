"""`cpt-kit export`: the recipe of an existing run, or a new run around a plain PEFT adapter + base.

A plain adapter gets a run directory with the adapter copied into `adapter/`, a recipe built from
its adapter_config.json (r, lora_alpha, rsLoRA, target modules), `adapter/cpt_kit_train.json`
naming the base, and the stages before merge recorded in the manifest as external.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable, Optional

from cpt_kit.errors import CptKitError
from cpt_kit.manifest import Manifest
from cpt_kit.recipe import Lora, Model, Recipe, Train, apply_overrides, recipe_from_dict
from cpt_kit.rundir import RunDir, atomic_path, atomic_write_json



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
                                 for p in source.iterdir() if p.is_file() and p.name != "cpt_kit_train.json")


def prepare_adapter_run(adapter_dir: Path, recipe: Recipe, run: RunDir) -> None:
    """Copy the adapter into the run and record the earlier stages as external (idempotent). The caller
    has checked that `run` is a run directory (or new) and holds its lock."""
    adapter_dir = Path(adapter_dir).resolve()
    if run.adapter.resolve() != adapter_dir and not _same_files(adapter_dir, run.adapter):
        with atomic_path(run.adapter) as tmp:
            shutil.copytree(adapter_dir, tmp)
            info = tmp / "cpt_kit_train.json"
            data = json.loads(info.read_text()) if info.is_file() else {}
            data.update(base=recipe.model.base, external=True, source=str(adapter_dir))
            atomic_write_json(info, data)
    from cpt_kit.pipeline import STAGES

    manifest = Manifest.load(run.manifest)
    for stage in STAGES[: STAGES.index("merge")]:
        manifest.data["stages"].setdefault(stage, {"status": "external", "source": str(adapter_dir)})
    manifest.save()
