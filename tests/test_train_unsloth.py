"""The Unsloth backend end to end (real Unsloth code path on CPU), in its own process.

`import unsloth` patches transformers, peft and trl for the whole process, so the run happens
in a subprocess: the other tests keep exercising plain transformers/PEFT/TRL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stage_helpers import adapter_tensors, base_tensors
from test_train import check_tied_base_kept_tied, check_trained_run

pytest.importorskip("unsloth")

SCRIPT = """
import json, sys
from pathlib import Path
import unsloth  # first, as in a real run
sys.path.insert(0, sys.argv[3])
from cpt_kit.recipe import recipe_from_dict
from stage_helpers import run_until
run_until(recipe_from_dict(json.loads(Path(sys.argv[1]).read_text())), Path(sys.argv[2]), sys.argv[4])
"""


def run_in_subprocess(recipe, tmp_path: Path, until: str = "evaluate") -> Path:
    """Run the pipeline up to `until` in a fresh process that imported unsloth first; returns the run dir."""
    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(json.dumps(recipe.to_dict()))
    root = tmp_path / "run"
    env = dict(os.environ, UNSLOTH_SKIP_TORCHVISION_CHECK="1", PYTHONPATH=str(Path(__file__).parent.parent))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(recipe_file), str(root), str(Path(__file__).parent), until],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root


@pytest.mark.slow
def test_unsloth_backend_end_to_end(tmp_path, tiny_recipe, tiny_base):
    recipe = tiny_recipe(train={"backend": "unsloth"})
    root = run_in_subprocess(recipe, tmp_path)
    metrics = check_trained_run(root, tiny_base, recipe, "unsloth")
    assert metrics["train"]["steps"] == 12


@pytest.mark.slow
def test_unsloth_tied_base_stays_tied_through_merge_and_gguf(tmp_path, tiny_recipe, tiny_tied):
    """Same meaning as the hf backend (test_train.py): one trained matrix, a tied merged model
    (whose logits the merge stage checks against base + adapter) and a GGUF without output.weight."""
    from gguf import GGUFReader

    from cpt_kit.recipe import Export, Model

    recipe = tiny_recipe(model=Model(base=str(tiny_tied), max_seq_length=64, load_in_4bit=False),
                         train={"backend": "unsloth", "max_steps": 4, "save_steps": 4, "eval_steps": 0},
                         export=Export(quantizations=("Q8_0",)))
    root = run_in_subprocess(recipe, tmp_path, until="gguf")
    info = check_tied_base_kept_tied(root, tiny_tied)
    assert info["backend"] == "unsloth"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["stages"]["merge"]["metrics"]["tied_merged"] is True
    assert "lm_head.weight" not in base_tensors(root / "merged")
    for gguf in ("tiny-F16.gguf", "tiny-Q8_0.gguf"):
        names = {t.name for t in GGUFReader(root / "gguf" / gguf).tensors}
        assert "token_embd.weight" in names and "output.weight" not in names, gguf  # llama.cpp reuses token_embd


@pytest.mark.slow
def test_unsloth_deleted_adapter_is_rewritten_from_the_final_checkpoint(tmp_path, tiny_recipe):
    """As with the hf backend (test_train.py): same recipe, adapter/ deleted -> the final checkpoint's
    weights are loaded into the Unsloth model, no step is trained again, the adapter is the same."""
    import shutil

    recipe = tiny_recipe(train={"backend": "unsloth", "max_steps": 4, "save_steps": 4, "eval_steps": 0})
    root = run_in_subprocess(recipe, tmp_path, until="train")
    before = adapter_tensors(root / "adapter")
    shutil.rmtree(root / "adapter")
    run_in_subprocess(recipe, tmp_path, until="train")
    train = json.loads((root / "manifest.json").read_text())["stages"]["train"]["metrics"]
    assert train["resumed_from_step"] == 4 and train["steps"] == 4 and train["backend"] == "unsloth"
    after = adapter_tensors(root / "adapter")
    assert after.keys() == before.keys() and all(after[k].equal(before[k]) for k in before)
