"""Run `cpt-kit run RECIPE --output-dir OUT` and SIGKILL it (with everything it started) at POINT.

Used by test_fault_injection.py: `python tests/fault_child.py POINT RECIPE OUT`. The hooks wrap
cpt-kit's own functions (and one Trainer method) in this throw-away process only; POINT "none"
runs to the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace


def die() -> None:
    """kill -9 this process and its children (the converter/quantizer subprocesses): the test
    starts this script in its own process group."""
    sys.stdout.flush()
    os.killpg(os.getpgrp(), signal.SIGKILL)


def after(module, name: str, when=lambda *args, **kwargs: True, calls: int = 1):
    """Replace module.name by a wrapper that runs it, then dies on the `calls`-th call where `when` holds."""
    original = getattr(module, name)
    seen = [0]

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        if when(*args, **kwargs):
            seen[0] += 1
            if seen[0] == calls:
                die()
        return result
    setattr(module, name, wrapper)


def during_subprocess(module, calls: int) -> None:
    """On the `calls`-th subprocess.run of `module`: start it, wait until its partial output file has
    bytes (or it ended), then die (the subprocess is killed with us)."""
    real = subprocess
    seen = [0]

    def run(cmd, **kwargs):
        seen[0] += 1
        if seen[0] != calls:
            return real.run(cmd, **kwargs)
        outputs = [Path(arg) for arg in cmd if ".partial-" in str(arg)]
        process = real.Popen(cmd, stdout=real.DEVNULL, stderr=real.DEVNULL, env=kwargs.get("env"), cwd=kwargs.get("cwd"))
        while process.poll() is None and not any(p.exists() and p.stat().st_size for p in outputs):
            time.sleep(0.01)
        die()
    module.subprocess = SimpleNamespace(**{k: getattr(real, k) for k in dir(real) if not k.startswith("_")})
    module.subprocess.run = run


def install(point: str) -> None:
    if point == "none":
        return
    if point == "tokenize":
        import cpt_kit.data.tokenize as tokenize
        after(tokenize, "encode_texts")  # the first batch of the corpus is tokenized
    elif point == "train_step_10":
        from transformers import TrainerCallback

        import cpt_kit.train.stage as train_stage

        class KillAtStep(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 10:
                    die()
        train_stage.EXTRA_CALLBACKS.append(KillAtStep())
    elif point == "checkpoint_8_write":
        from transformers import Trainer

        original = Trainer._save_optimizer_and_scheduler

        def save_then_cut_off(self, output_dir, *args, **kwargs):
            original(self, output_dir, *args, **kwargs)
            if str(output_dir).endswith("checkpoint-8"):  # weights written, half the optimizer state, no trainer_state.json
                optimizer = Path(output_dir) / "optimizer.pt"
                optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
                die()
        Trainer._save_optimizer_and_scheduler = save_then_cut_off
    elif point == "evaluate":
        import cpt_kit.perplexity as perplexity
        after(perplexity, "hf_scores", calls=2)  # the base is scored, the trained model not yet
    elif point == "merge":
        import cpt_kit.export.safetensors_io as safetensors_io
        after(safetensors_io, "write_safetensors")  # a merged shard is written, merged/ not renamed yet
    elif point == "compare":
        import cpt_kit.compare as compare
        after(compare, "atomic_write_json")  # comparison.json written, comparison.md not yet
    elif point in ("convert", "quantize"):
        import cpt_kit.export.gguf as gguf
        during_subprocess(gguf, calls=1 if point == "convert" else 2)
    elif point == "modelfile":
        import cpt_kit.export.modelfile_stage as modelfile_stage
        after(modelfile_stage, "atomic_write_text")
    elif point == "verify":
        import cpt_kit.perplexity as perplexity
        after(perplexity, "gguf_scores")  # the first GGUF is scored
    elif point == "report":
        from matplotlib.figure import Figure
        after(Figure, "savefig")  # the first plot is written into the unfinished report/ folder
    else:
        raise SystemExit(f"unknown fault point {point!r}")


if __name__ == "__main__":
    point, recipe, out = sys.argv[1:4]
    install(point)
    from cpt_kit.cli import main
    main(["run", recipe, "--output-dir", out])
