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

from test_train import check_trained_run

pytest.importorskip("unsloth")

SCRIPT = """
import json, sys
from pathlib import Path
import unsloth  # first, as in a real run
sys.path.insert(0, sys.argv[3])
from cpt_kit.recipe import recipe_from_dict
from stage_helpers import run_until
run_until(recipe_from_dict(json.loads(Path(sys.argv[1]).read_text())), Path(sys.argv[2]))
"""


@pytest.mark.slow
def test_unsloth_backend_end_to_end(tmp_path, tiny_recipe, tiny_base):
    recipe = tiny_recipe(train={"backend": "unsloth"})
    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(json.dumps(recipe.to_dict()))
    root = tmp_path / "run"
    env = dict(os.environ, UNSLOTH_SKIP_TORCHVISION_CHECK="1", PYTHONPATH=str(Path(__file__).parent.parent))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(recipe_file), str(root), str(Path(__file__).parent)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    metrics = check_trained_run(root, tiny_base, recipe, "unsloth")
    assert metrics["train"]["steps"] == 12
