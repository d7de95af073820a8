"""Training step time: cpt-kit's backends against a plain transformers+PEFT Trainer script, same run.

Each run trains in its own process (`import unsloth` patches transformers/peft/trl for the
whole process, so sharing one would not measure plain HF) on random-token blocks (step time
does not depend on the text), with the same model, LoRA (r, alpha=r, all linear layers,
embed_tokens/lm_head as full weights), batch, sequence length and precision:

- `plain`: what a user writes by hand: `Trainer` + `get_peft_model`, default optimizer, no
  callbacks of ours. It is the baseline; every other run is reported as a ratio of its step time.
- `hf`, `unsloth`: the real cpt-kit train stage with that backend (callbacks, logs, NaN guard).
- a `+gc` suffix turns gradient checkpointing on for that run (`hf+gc`, `plain+gc`).
- an `@DIR` suffix runs the cpt-kit code of another checkout (`hf@/tmp/old-checkout`): a before/after
  comparison of a change in the same run.

`--repeat N` runs the whole list N times, interleaved, and reports the median over the repeats
(on a shared machine the load changes from minute to minute).

Step time is the median interval between consecutive optimizer steps after `--warmup` steps,
measured by the same callback in every run. Prints a table; `--out BENCHMARKS.md` adds it as a new
subsection at the end of that file's "## train" section (nothing already there changes).

    python bench/train.py                                   # tiny offline model, CPU
    python bench/train.py --shape smollm-135m --seq-len 256 --batch-size 2 --steps 8 --runs plain,hf,hf+gc
    python bench/train.py --model unsloth/Llama-3.2-1B --seq-len 2048 --steps 30 --load-in-4bit
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.markdown import add_to_section  # noqa: E402
from bench.worker import run_worker  # noqa: E402
LR, EMBED_LR = 5e-5, 5e-6


def step_timer():
    """A TrainerCallback recording (wall clock, process CPU time) at every optimizer step's end.

    CPU time (all threads of the process) is what the step cost, nearly independent of how many
    other processes share the machine; wall time is what a user waits."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[tuple[float, float]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.ends.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append((time.perf_counter(), time.process_time()))

    return StepTimer()


def random_blocks(args: argparse.Namespace) -> list[list[int]]:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    vocab = min(AutoConfig.from_pretrained(args.model).vocab_size, len(AutoTokenizer.from_pretrained(args.model)))
    n_blocks = args.steps * args.batch_size * args.grad_accum + 8
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (n_blocks, args.seq_len), generator=g).tolist()


def plain_worker(args: argparse.Namespace, work: Path, gradient_checkpointing: bool, timer) -> dict:
    """The baseline: a plain transformers + PEFT Trainer script, nothing of cpt-kit."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if bf16 else torch.float32)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    tied = bool(model.config.tie_word_embeddings)
    model = get_peft_model(model, LoraConfig(
        r=args.r, lora_alpha=args.r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"],
        modules_to_save=["embed_tokens", "lm_head"], ensure_weight_tying=tied, task_type="CAUSAL_LM"))
    blocks = random_blocks(args)
    data = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    targs = TrainingArguments(output_dir=str(work / "plain"), per_device_train_batch_size=args.batch_size,
                              gradient_accumulation_steps=args.grad_accum, max_steps=args.steps, learning_rate=LR,
                              logging_steps=1, save_strategy="no", report_to="none", bf16=bf16, use_cpu=not cuda)
    trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=default_data_collator,
                      callbacks=[timer])
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"precision": "bf16" if bf16 else "fp32", "first_loss": losses[0], "last_loss": losses[-1],
            "device_type": "cuda" if cuda else "cpu"}


def cpt_kit_worker(args: argparse.Namespace, work: Path, backend: str, gradient_checkpointing: bool, timer) -> dict:
    """The real train stage with `backend`."""
    import io

    from datasets import Dataset
    from rich.console import Console
    from transformers import AutoTokenizer

    from cpt_kit.manifest import Manifest
    from cpt_kit.pipeline import StageContext
    from cpt_kit.recipe import Lora, Model, Recipe, Train
    from cpt_kit.rundir import RunDir
    from cpt_kit.train import stage

    run = RunDir(work / f"run-{backend}")
    AutoTokenizer.from_pretrained(args.model).save_pretrained(run.tokenizer)
    if (Path(args.model) / "tokenizer.model").is_file():
        (run.tokenizer / "tokenizer.model").write_bytes((Path(args.model) / "tokenizer.model").read_bytes())
    blocks = random_blocks(args)
    Dataset.from_dict({"input_ids": blocks}).save_to_disk(str(run.data / "train"))
    Dataset.from_dict({"input_ids": blocks[:4]}).save_to_disk(str(run.data / "heldout"))
    recipe = Recipe(
        name="bench", model=Model(base=args.model, max_seq_length=args.seq_len, load_in_4bit=args.load_in_4bit),
        lora=Lora(r=args.r, lora_alpha=args.r, use_rslora=False, train_embeddings=True),
        train=Train(backend=backend, learning_rate=LR, embedding_learning_rate=EMBED_LR, max_steps=args.steps,
                    per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
                    eval_steps=0, save_steps=args.steps * 10, warmup_ratio=0.0,
                    gradient_checkpointing=gradient_checkpointing))
    ctx = StageContext(recipe, run, Manifest.load(run.manifest), Console(file=io.StringIO()), "bench")
    stage.EXTRA_CALLBACKS.append(timer)
    metrics = stage.run(ctx)
    return {"precision": metrics["precision"], "first_loss": metrics["first_train_loss"],
            "last_loss": metrics["last_train_loss"], "loaded_in_4bit": metrics["loaded_in_4bit"],
            "device_type": ctx.hardware.device}


def worker(args: argparse.Namespace) -> None:
    """Train once (`args.worker` is a run name such as hf+gc or hf@DIR) inside `args.work`; print a JSON result."""
    spec, _, code = args.worker.partition("@")
    if code:
        sys.path.insert(0, code)  # that checkout's cpt_kit (imported below, not before)
    name, _, suffix = spec.partition("+")
    if name == "unsloth":
        import unsloth  # noqa: F401  (first)
    from cpt_kit.train.callbacks import memory_mb

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    timer = step_timer()
    work, gc = Path(args.work) / f"repeat-{args.repeat_index}-{spec}{'-other' if code else ''}", suffix == "gc"
    work.mkdir(parents=True)
    if name == "plain":
        result = plain_worker(args, work, gc, timer)
    else:
        result = cpt_kit_worker(args, work, name, gc, timer)
    import cpt_kit

    pairs = list(zip(timer.ends, timer.ends[1:]))[args.warmup:]
    step = statistics.median(b[0] - a[0] for a, b in pairs)
    cpu = statistics.median(b[1] - a[1] for a, b in pairs)
    print("RESULT " + json.dumps(dict(
        result, run=args.worker, seconds_per_step=round(step, 4), cpu_seconds_per_step=round(cpu, 4),
        steps_timed=len(pairs), cpt_kit=str(Path(cpt_kit.__file__).parent),
        tokens_per_second=round(args.seq_len * args.batch_size * args.grad_accum / step, 1),
        memory_mb=memory_mb(result["device_type"]))))


def run_one(name: str, args: argparse.Namespace, work: Path, repeat: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--work", str(work), "--repeat-index", str(repeat),
           "--model", args.model,
           "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum), "--r", str(args.r),
           "--threads", str(args.threads)]
    cmd += ["--load-in-4bit"] if args.load_in_4bit else []
    result = run_worker(cmd)
    if result is None:
        raise SystemExit(f"run {name} failed")
    spec, _, code = name.partition("@")
    result["run"] = f"{spec} ({Path(code).name} checkout)" if code else spec
    print(json.dumps(result), flush=True)
    return result


def median_over_repeats(results: list[dict]) -> list[dict]:
    """One row per run name: the median step time over the repeats (and its range), first-seen order."""
    rows = []
    for name in dict.fromkeys(r["run"] for r in results):
        mine = [r for r in results if r["run"] == name]
        steps = [r["seconds_per_step"] for r in mine]
        cpu = [r["cpu_seconds_per_step"] for r in mine]
        row = dict(mine[0], seconds_per_step=statistics.median(steps), step_range=(min(steps), max(steps)),
                   cpu_seconds_per_step=statistics.median(cpu), cpu_range=(min(cpu), max(cpu)),
                   repeats=len(mine), memory_mb=max(r["memory_mb"] for r in mine))
        row["tokens_per_second"] = round(mine[0]["tokens_per_second"] * mine[0]["seconds_per_step"]
                                         / row["seconds_per_step"], 1)
        rows.append(row)
    return rows


def report(args: argparse.Namespace, results: list[dict], model_label: str) -> str:
    base = next((r for r in results if r["run"] == "plain"), results[0])
    rows = [f"| run | wall s/step (range) | x {base['run']} | CPU s/step (range) | x {base['run']} | tokens/s "
            "| memory MB | precision | loss first -> last |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        (low, high), (cpu_low, cpu_high) = r["step_range"], r["cpu_range"]
        rows.append(f"| {r['run']} | {r['seconds_per_step']:.3f} ({low:.3f}-{high:.3f}) "
                    f"| {r['seconds_per_step'] / base['seconds_per_step']:.2f}x "
                    f"| {r['cpu_seconds_per_step']:.3f} ({cpu_low:.3f}-{cpu_high:.3f}) "
                    f"| {r['cpu_seconds_per_step'] / base['cpu_seconds_per_step']:.2f}x | {r['tokens_per_second']:.0f} "
                    f"| {r['memory_mb']:.0f} | {r['precision']} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
    memory_kind = "CUDA peak allocated" if results[0]["device_type"] == "cuda" else "peak process RSS"
    return f"""### bench/train.py, {datetime.date.today().isoformat()}, {os.cpu_count()} CPU threads

Training step time: cpt-kit's train stage (hf / unsloth backend) against a plain transformers+PEFT
`Trainer` script (`plain`, the baseline), same model and config, each run in its own process, same
run. LoRA r={args.r} (alpha={args.r}) on all linear layers + embed_tokens/lm_head as full weights;
`+gc` = gradient checkpointing on. s/step = median interval between optimizer steps after
{args.warmup} warm-up steps, median over {args.repeat} interleaved repeat(s); wall = elapsed time,
CPU = CPU time of the training process (all threads), the steadier number on a shared machine.

- command: `python bench/train.py {' '.join(sys.argv[1:])}`
- machine: {os.cpu_count()} CPU threads ({args.threads or 'default'} torch threads per run), load average
  {os.getloadavg()[0]:.1f} at the end (a shared machine's numbers carry that noise; compare ratios within
  one run); memory column: {memory_kind}
- date: {datetime.date.today().isoformat()}
- model: {model_label}; seq {args.seq_len}, batch {args.batch_size} x accumulation {args.grad_accum},
  {args.steps} steps, load_in_4bit requested: {args.load_in_4bit}

{chr(10).join(rows)}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="hub id or local model dir (default: a tiny offline Llama)")
    p.add_argument("--shape", default=None, help="build a random model of this shape offline "
                   "(see bench/make_random_model.py: smollm-135m, llama-3.2-1b, ...)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--load-in-4bit", action="store_true", help="4-bit base for cpt-kit runs (CUDA only)")
    p.add_argument("--runs", default="plain,hf,hf+gc,unsloth",
                   help="comma-separated: plain, hf, unsloth, each optionally with +gc and/or @DIR (another checkout)")
    p.add_argument("--repeat", type=int, default=1, help="run the list this many times, interleaved")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per run (0: torch's default); 1 keeps "
                   "an oversubscribed shared machine from inflating CPU time with spinning threads")
    p.add_argument("--out", help="add the table to the '## train' section of this Markdown file (e.g. BENCHMARKS.md)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--repeat-index", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory(prefix="cpt-bench-train-") as tmp:
        work = Path(tmp)
        model_label = args.model
        if args.shape:
            from make_random_model import build_random_model
            args.model = str(build_random_model(work / args.shape, args.shape))
            model_label = f"random weights, {args.shape} shape (bench/make_random_model.py), bf16 on disk"
        elif args.model is None:
            from cpt_kit.tiny_model import build_tiny_model
            texts = [p.read_text(encoding="utf-8") for p in sorted((REPO / "examples/data/general").glob("*.txt"))]
            args.model = str(build_tiny_model(work / "tiny", texts))
            model_label = "tiny Llama (hidden 256, 2 layers, vocab ~1000, built offline)"
        names = [name.strip() for name in args.runs.split(",") if name.strip()]
        results = [run_one(name, args, work, i) for i in range(args.repeat) for name in names]
    section = report(args, median_over_repeats(results), model_label)
    print(section)
    if args.out:
        add_to_section(Path(args.out), "train", section)


if __name__ == "__main__":
    main()
