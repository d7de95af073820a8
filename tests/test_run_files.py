"""Readers of run files: which checkpoint training can resume from."""

from __future__ import annotations

import json

from cpt_kit.run_files import checkpoint_problem
from cpt_kit.train.stage import resume_checkpoint


def _checkpoint(root, step: int):
    import torch
    from safetensors.torch import save_file

    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"lora_A": torch.ones(8, 16), "lora_B": torch.zeros(16, 8)}, str(folder / "adapter_model.safetensors"))
    torch.save({"state": {0: torch.ones(100)}}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_truncated_files_make_a_checkpoint_unusable(tmp_path):
    folder = _checkpoint(tmp_path, 4)
    assert checkpoint_problem(folder) is None
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    assert checkpoint_problem(folder) == "adapter_model.safetensors is truncated"
    weights.write_bytes(data)
    optimizer = folder / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    assert checkpoint_problem(folder) == "optimizer.pt is truncated or damaged"
    (folder / "trainer_state.json").write_text('{"global_st')
    assert checkpoint_problem(folder) == "its trainer_state.json is cut off"


def test_resume_skips_a_corrupted_newest_checkpoint_with_a_message(tmp_path):
    _checkpoint(tmp_path, 4)
    newest = _checkpoint(tmp_path, 8)
    (newest / "adapter_model.safetensors").write_bytes((newest / "adapter_model.safetensors").read_bytes()[:200])
    cut = _checkpoint(tmp_path, 12)
    (cut / "trainer_state.json").unlink()  # killed while being written
    messages: list[str] = []
    assert resume_checkpoint(tmp_path, messages.append).name == "checkpoint-4"
    assert len(messages) == 2 and "checkpoint-12" in messages[0] and "no trainer_state.json" in messages[0]
    assert "checkpoint-8" in messages[1] and "adapter_model.safetensors is truncated" in messages[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def test_train_setup_repr_never_shows_the_hub_token(tmp_path):
    from cpt_kit.recipe import Model, Recipe
    from cpt_kit.train.backend import TrainSetup

    setup = TrainSetup(recipe=Recipe(name="t", model=Model(base="m")), base="m",
                       load_kwargs={"token": "hf_SECRETtokenVALUE", "trust_remote_code": False},
                       tokenizer_dir=tmp_path, device="cpu", precision="fp32", load_in_4bit=False, optim="adamw_torch",
                       gradient_checkpointing=False,
                       output_dir=tmp_path)
    assert "hf_SECRET" not in repr(setup) and "hf_SECRET" not in str(setup)
    assert setup.load_kwargs["token"] == "hf_SECRETtokenVALUE"


def test_no_stage_imports_another_stage():
    """Stages depend on files, not on each other: no stage module (STAGE_TABLE; for a package, none of
    its files) imports another one, at module level or inside a function."""
    import ast
    import importlib.util
    from pathlib import Path

    from cpt_kit.pipeline import STAGE_TABLE

    modules = {stage.module for stage in STAGE_TABLE}
    found = []
    for module in sorted(modules):
        spec = importlib.util.find_spec(module)
        files = sorted(Path(spec.origin).parent.glob("*.py")) if spec.submodule_search_locations else [spec.origin]
        tree = ast.Module(body=[n for f in files for n in ast.parse(Path(f).read_text(encoding="utf-8")).body],
                          type_ignores=[])
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                names = {alias.name for alias in node.names}
            else:
                continue
            found += [f"{module} imports {name}" for name in sorted(names & (modules - {module}))]
    assert found == []
