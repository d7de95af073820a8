"""The planner's memory estimate against measured peaks of real training runs.

Each configuration trains a random-weight model of a real shape for a few steps through the real
train stage (bench/train.py's worker, one process per run) and compares the peak it measured
(CUDA max allocated on a GPU, process RSS on CPU) with `cpt_kit.planner`'s estimate for the same
settings. An estimate more than 25% off is a bug in the planner, not a footnote.

On CPU it also runs the shipped demo recipes as they are (recipes/demo.py, CPT on the tiny model,
then recipes/demo_chat.py, SFT on the demo's merged model): prepare in one process, the train stage
in a fresh one (`cpt-kit run RECIPE --stage train`), whose peak RSS (VmHWM, the largest memory_mb
in logs/train.jsonl) and training time (train_runtime, evaluation during training included) are
compared with `cpt-kit plan RECIPE --gpu cpu --output-dir RUN` on the prepared run.

    python bench/plan_check.py                 # the GPU configurations (needs CUDA)
    python bench/plan_check.py --cpu           # the CPU configurations
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.markdown import add_to_section  # noqa: E402
from bench.worker import run_worker  # noqa: E402

GPU_RUNS = [
    dict(shape="llama-3.2-1b", backend="unsloth", seq=2048, batch=2, r=128, gc=True),
    dict(shape="qwen2.5-0.5b-like", backend="unsloth", seq=1024, batch=4, r=64, gc=True),
    dict(shape="llama-3.2-1b", backend="hf", seq=1024, batch=2, r=16, gc=True),
]
CPU_RUNS = [dict(shape="cpu-32k", backend="hf", seq=256, batch=4, r=16, gc=False)]
RECIPE_RUNS = [dict(recipe="demo"), dict(recipe="demo_chat", base="demo")]
"""CPU runs of shipped recipes; `base` names the recipe whose run (made first, to its merge) is the base."""


def measure(run: dict, work: Path, steps: int) -> float:
    model = work / run["shape"]
    if not (model / "config.json").is_file():
        subprocess.run([sys.executable, str(REPO / "bench" / "make_random_model.py"), str(model), "--shape", run["shape"]],
                       check=True, capture_output=True)
    worker = run["backend"] + ("+gc" if run["gc"] else "")
    cmd = [sys.executable, str(REPO / "bench" / "train.py"), "--worker", worker, "--work", str(work / "w"),
           "--model", str(model), "--seq-len", str(run["seq"]), "--steps", str(steps), "--warmup", "1",
           "--batch-size", str(run["batch"]), "--r", str(run["r"]), "--load-in-4bit"]
    result = run_worker(cmd)
    if result is None:
        raise SystemExit(f"{run} failed")
    subprocess.run(["rm", "-rf", str(work / "w")], check=False)
    return result["memory_mb"]


def measure_recipe(recipe: Path, run_dir: Path, overrides: list[str]) -> dict:
    """Prepare `recipe` into `run_dir`, then run its train stage in a fresh process; its peak RSS
    (MiB), training seconds, and the planner's estimate for the prepared run."""
    from cpt_kit.planner import plan_recipe
    from cpt_kit.planner.gpus import DEVICES
    from cpt_kit.recipe import apply_overrides, load_recipe

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cli = [sys.executable, "-m", "cpt_kit.cli", "run", str(recipe), "--output-dir", str(run_dir)]
    cli += [arg for o in overrides for arg in ("--set", o)]
    for until in (["--until", "prepare"], ["--stage", "train"]):
        proc = subprocess.run(cli + until, capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cli + until)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    log = [json.loads(line) for line in (run_dir / "logs" / "train.jsonl").read_text().splitlines() if line.strip()]
    metrics = json.loads((run_dir / "manifest.json").read_text())["stages"]["train"]["metrics"]
    plan = plan_recipe(apply_overrides(load_recipe(recipe), overrides), DEVICES["cpu"], run_dir=run_dir)
    return {"peak_mib": max(r.get("memory_mb", 0) for r in log), "train_seconds": metrics["train_runtime"],
            "steps": metrics["steps"], "estimated_mib": plan.needed_gib * 1024,
            "estimated_seconds": plan.hours * 3600 if plan.hours is not None else None,
            "padded_tokens": plan.train_tokens, "settings": plan.settings}


def recipe_rows(runs: list[dict], work: Path, steps: int) -> list[str]:
    rows = ["| recipe | objective | seq x batch | steps | measured peak MiB | estimated MiB | error "
            "| measured train s | estimated s | error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        overrides = [f"train.max_steps={steps}"] if steps else []
        if run.get("base"):
            base = work / run["base"]
            if not (base / "merged" / "config.json").is_file():
                subprocess.run([sys.executable, "-m", "cpt_kit.cli", "run", str(REPO / "recipes" / f"{run['base']}.py"),
                                "--output-dir", str(base), "--until", "merge", *sum((["--set", o] for o in overrides), [])],
                               check=True, capture_output=True, cwd=REPO,
                               env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1"))
            overrides.append(f"model.base={base}")
        m = measure_recipe(REPO / "recipes" / f"{run['recipe']}.py", work / run["recipe"], overrides)
        s = m["settings"]
        seconds = m["estimated_seconds"]
        rows.append(f"| {run['recipe']} | {'SFT, batches padded' if s.padded_batches else 'CPT'} | {s.seq_len} x "
                    f"{s.batch_size} | {m['steps']} | {m['peak_mib']:,.0f} | {m['estimated_mib']:,.0f} | "
                    f"{(m['estimated_mib'] - m['peak_mib']) / m['peak_mib'] * 100:+.1f}% | {m['train_seconds']:.0f} | "
                    f"{seconds:.0f} | {(seconds - m['train_seconds']) / m['train_seconds'] * 100:+.0f}% |")
        print(rows[-1], flush=True)
    return rows


def estimate_mib(run: dict, cuda: bool) -> tuple[float, float]:
    """(peak of live tensors, what the process needs) in MiB, as the planner estimates them."""
    from bench.make_random_model import SHAPES
    from cpt_kit.planner.estimate import Settings, estimate
    from cpt_kit.planner.shapes import shape_from_config
    from cpt_kit.recipe import ALL_LINEAR

    hidden, layers, heads, kv, inter, vocab, tied = SHAPES[run["shape"]]
    shape = shape_from_config(dict(model_type="llama", hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                                   vocab_size=vocab, tie_word_embeddings=tied), run["shape"])
    est = estimate(shape, Settings(batch_size=run["batch"], seq_len=run["seq"], r=run["r"], targets=ALL_LINEAR,
                                   train_embeddings=True, load_in_4bit=cuda, gradient_checkpointing=run["gc"],
                                   backend=run["backend"], cuda=cuda, eight_bit_optimizer=cuda))
    return est.peak_bytes / 2**20, est.needed_gib(cuda) * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--only", help="comma-separated indices of the configurations to run (default: all)")
    p.add_argument("--recipes", default="demo,demo_chat",
                   help="on CPU, the shipped recipes to measure as they are (comma-separated; '' for none)")
    p.add_argument("--recipe-steps", type=int, default=0, help="train.max_steps for them (0: the recipe's own)")
    p.add_argument("--out", help="add the table to the '## planner' section of this Markdown file")
    args = p.parse_args()
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    rows = ["| model shape | backend | seq x batch | r | grad. ckpt | measured MiB | estimated MiB | error |",
            "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="cpt-plan-check-") as tmp:
        runs = GPU_RUNS if cuda else CPU_RUNS
        for run in [runs[int(i)] for i in args.only.split(",")] if args.only else runs:
            measured = measure(run, Path(tmp), args.steps)
            peak, needed = estimate_mib(run, cuda)
            compared = peak if cuda else needed  # CUDA max allocated vs live tensors; RSS vs the whole process
            rows.append(f"| {run['shape']} | {run['backend']} | {run['seq']} x {run['batch']} | {run['r']} | "
                        f"{'on' if run['gc'] else 'off'} | {measured:,.0f} | {compared:,.0f} | "
                        f"{(compared - measured) / measured * 100:+.1f}% |")
            print(rows[-1], flush=True)
        wanted = [r for r in RECIPE_RUNS if r["recipe"] in args.recipes.split(",")] if not cuda else []
        recipe_table = recipe_rows(wanted, Path(tmp), args.recipe_steps) if wanted else []
    kind = "CUDA max allocated vs estimated peak tensors" if cuda else "process peak RSS vs estimated process total"
    load = os.getloadavg()
    text = (f"### {device}, {datetime.date.today()}\n\ncommand: `python bench/plan_check.py {' '.join(sys.argv[1:])}`"
            f"; machine: {os.cpu_count()} CPU threads, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
            f"(1/5/15 min) at the end; random-shape models: {args.steps} steps each; {kind}\n\n" + "\n".join(rows) + "\n")
    if recipe_table:
        text += ("\nShipped recipes as they are (prepare, then the train stage in a fresh process; peak RSS = the "
                 "largest memory_mb in logs/train.jsonl; train s = train_runtime, evaluation during training included; "
                 "estimated = `cpt-kit plan RECIPE --gpu cpu --output-dir RUN` on the prepared run):\n\n"
                 + "\n".join(recipe_table) + "\n")
    print(text)
    if args.out:
        add_to_section(Path(args.out), "planner", text)


if __name__ == "__main__":
    main()
