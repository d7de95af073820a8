"""The planner's memory estimate against measured peaks of real training runs.

Each configuration trains a random-weight model of a real shape for a few steps through the real
train stage (bench/train.py's worker, one process per run) and compares the peak it measured
(CUDA max allocated on a GPU, process RSS on CPU) with `cpt_kit.planner`'s estimate for the same
settings. An estimate more than 25% off is a bug in the planner, not a footnote.

    python bench/plan_check.py                 # the GPU configurations (needs CUDA)
    python bench/plan_check.py --cpu           # a CPU configuration
"""

from __future__ import annotations

import argparse
import datetime
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
    kind = "CUDA max allocated vs estimated peak tensors" if cuda else "process peak RSS vs estimated process total"
    text = (f"### {device}, {datetime.date.today()}\n\ncommand: `python bench/plan_check.py{' --cpu' if args.cpu else ''}`"
            f"; {args.steps} steps each; {kind}\n\n" + "\n".join(rows) + "\n")
    print(text)
    if args.out:
        add_to_section(Path(args.out), "planner", text)


if __name__ == "__main__":
    main()
