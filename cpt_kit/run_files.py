"""Readers of the files stages leave in a run directory (the layout is `cpt_kit.rundir.RunDir`).

Stages depend on each other only through these files: a stage reads what an earlier one wrote
with the functions here, never by importing that stage's module.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Any, Optional

from cpt_kit.errors import DataError, ExportError, TrainingError
from cpt_kit.rundir import RunDir


def read_train_info(adapter_dir: Path, required: bool = True) -> dict[str, Any]:
    """adapter/cpt_kit_train.json (what the evaluate and export steps need to rebuild the base).

    With required=False a missing file (an adapter not trained by cpt-kit) gives {}."""
    path = Path(adapter_dir) / "cpt_kit_train.json"
    if not path.is_file():
        if not required:
            return {}
        raise TrainingError(f"{path} is missing", where=str(adapter_dir), hint="run the train stage first")
    return json.loads(path.read_text(encoding="utf-8"))


def read_extension(path: Path) -> Optional[dict[str, Any]]:
    """data/tokenizer_extension.json, or None when the vocabulary was not extended."""
    path = Path(path)
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    for i, item in enumerate(record.get("added", [])):
        if not item.get("init_ids") and item.get("init") != "mean":  # chat control tokens start at the mean row
            raise DataError(f"added token {item.get('token')!r} has no init_ids", where=f"{path}: added[{i}]",
                            hint="rerun the prepare stage (cpt-kit run ... --stage prepare --force)")
    return record


def heldout_texts(run: RunDir, limit: int = 8) -> list[str]:
    """The first `limit` held-out documents prepare wrote (none for a run without data/)."""
    path = run.data / "heldout_texts.jsonl"
    if not path.is_file():
        return []
    texts: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                texts.append(json.loads(line)["text"])
            if len(texts) == limit:
                break
    return texts


def tokenizer_dir(run: RunDir) -> Path:
    """merged/ when it has a tokenizer, else data/tokenizer (the tokenizer training used)."""
    for folder in (run.merged, run.tokenizer):
        if (folder / "tokenizer_config.json").is_file():
            return folder
    raise ExportError(f"no tokenizer in {run.merged} or {run.tokenizer}", where=str(run.root),
                      hint="run the merge stage first")


def eos_ids(model_dir: Path) -> tuple[int, ...]:
    """eos_token_id of generation_config.json (an int or a list; chat models often list several)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return ()
    value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    return tuple(value) if isinstance(value, list) else (value,) if isinstance(value, int) else ()


def gguf_path(run: RunDir, name: str, kind: str) -> Path:
    """Path of one GGUF of a run: kind is the outtype (f16/bf16) or a quantization (Q4_K_M...)."""
    return run.gguf / f"{name}-{kind.upper()}.gguf"


def gguf_files(run: RunDir, recipe) -> dict[str, Path]:
    """{"F16" (or "BF16"): path, "Q4_K_M": path, ...}: the files the gguf stage writes for `recipe`."""
    base = recipe.export.outtype.upper()
    files = {base: gguf_path(run, recipe.name, base)}
    for quant in recipe.export.quantizations:
        files.setdefault(quant.upper(), gguf_path(run, recipe.name, quant))
    return files


def quality_path(run: RunDir) -> Path:
    """gguf/quality.json: each quantization measured against the unquantized GGUF and gated (gguf stage)."""
    return run.gguf / "quality.json"


def read_quality(run: RunDir) -> dict[str, Any]:
    """gguf/quality.json; ExportError when the gguf stage has not written it."""
    path = quality_path(run)
    if not path.is_file():
        raise ExportError(f"{path} does not exist", where=str(run.root), hint="run the gguf stage first")
    return json.loads(path.read_text(encoding="utf-8"))


def chosen_quant(recipe) -> str:
    """The GGUF the recipe wants the Modelfile to serve: export.modelfile_quant, else the first quantization
    (the modelfile stage serves another when this one failed its limits in gguf/quality.json)."""
    export = recipe.export
    return (export.modelfile_quant or (export.quantizations[0] if export.quantizations else export.outtype)).upper()


def checkpoint_problem(checkpoint: Path) -> Optional[str]:
    """Why a `checkpoints/checkpoint-N/` cannot be resumed from (None: complete). trainer_state.json is
    written last, so a checkpoint cut off while being written has none; a truncated weight or optimizer
    file (disk full, a copy cut short) is caught by its declared size (safetensors) or zip index (torch)."""
    state = checkpoint / "trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "it has no trainer_state.json (it was being written when the run stopped)"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "its trainer_state.json is cut off"
    for path in sorted(checkpoint.iterdir()):
        if path.suffix == ".safetensors" and _safetensors_size(path) != path.stat().st_size:
            return f"{path.name} is truncated"
        if path.suffix in (".pt", ".pth", ".bin"):
            try:
                zipfile.ZipFile(path).close()
            except (zipfile.BadZipFile, OSError):
                return f"{path.name} is truncated or damaged"
    return None


def _safetensors_size(path: Path) -> int:
    """The size a safetensors file must have: 8 + header length + the end of its last tensor (-1 if unreadable)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (struct.error, ValueError, UnicodeDecodeError, OSError):
        return -1
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    return 8 + length + max(ends, default=0)


def checkpoints_newest_first(checkpoints: Path) -> list[tuple[int, Path]]:
    found = []
    for path in Path(checkpoints).glob("checkpoint-*"):
        suffix = path.name.rsplit("-", 1)[-1]
        if suffix.isdigit() and path.is_dir():
            found.append((int(suffix), path))
    return sorted(found, reverse=True)


def load_prepared_split(data_dir: Path, name: str, in_memory: bool = False):
    """data/<name> (train, heldout) as prepare saved it; a missing split says to run prepare.

    in_memory: read it into memory, so that no later `Dataset.map` (TRL's packer, a trainer's own
    preprocessing) writes a cache-*.arrow file into the run's data folder, which is a recorded input
    of the stages after prepare (a new file there would make the next run redo them)."""
    from datasets import load_from_disk

    path = Path(data_dir) / name
    if not path.is_dir():
        raise DataError(f"{path} does not exist", where=str(path),
                        hint="run the prepare stage first (cpt-kit run RECIPE --until prepare)")
    return path, load_from_disk(str(path), keep_in_memory=in_memory)
