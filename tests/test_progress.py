"""cpt_kit.progress: plain lines when output is not a terminal, a rich bar when it is."""

from __future__ import annotations

import io
import re

from rich.console import Console


def plain_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200), out  # a file: not a terminal


def test_plain_lines_at_start_every_tenth_and_end():
    from cpt_kit.progress import progress

    console, out = plain_console()
    with progress(console, "tokenize", 100, unit="docs", every_seconds=3600) as bar:
        for _ in range(100):
            bar.advance(1)
    lines = out.getvalue().splitlines()
    counts = [int(re.search(r"tokenize  (\d+)/100 docs", line).group(1)) for line in lines]
    assert counts == list(range(0, 101, 10))  # start, every 10%, and the end printed once
    assert "(100%)" in lines[-1] and "elapsed 0:00:0" in lines[-1]
    assert re.search(r"[\d,.]+ docs/s", lines[-1]) and "ETA 0:00:00" in lines[-1]


def test_plain_lines_every_few_seconds_with_fields_rate_and_eta(monkeypatch):
    from cpt_kit import progress as module

    clock = iter(range(0, 1000, 10))  # every call to the clock is 10 s later
    monkeypatch.setattr(module.time, "perf_counter", lambda: float(next(clock)))
    console, out = plain_console()
    bar = module.progress(console, "train", 1000, unit="steps", rate_scale=512, rate_unit="tok/s",
                          every_seconds=30)
    for step in range(1, 6):
        bar.update(step, loss=f"{3 - step / 10:.3f}")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3 and lines[0].startswith("  train  0/1,000 steps (0%)")
    last = lines[-1]
    assert "5/1,000 steps (0%)" in last and "loss 2.500" in last
    # 5 steps x 512 tokens over the elapsed time, and an ETA for the 995 steps left at that pace
    minutes, seconds = map(int, re.search(r"elapsed 0:(\d\d):(\d\d)", last).groups())
    elapsed = minutes * 60 + seconds
    rate = float(re.search(r"([\d.]+) tok/s", last).group(1))
    assert elapsed > 0 and abs(rate - 5 * 512 / elapsed) <= 0.5
    h, m, s = map(int, re.search(r"ETA (\d+):(\d\d):(\d\d)", last).groups())
    assert abs((h * 3600 + m * 60 + s) - 995 * elapsed / 5) <= 1


def test_unknown_total_prints_counts_without_eta():
    from cpt_kit.progress import progress

    console, out = plain_console()
    with progress(console, "convert", None, unit="tensors") as bar:
        bar.advance(7)
    last = out.getvalue().splitlines()[-1]
    assert "convert  7 tensors" in last and "ETA" not in last and "%" not in last


def test_terminal_gets_a_bar_not_lines():
    from cpt_kit.progress import progress

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with progress(console, "merge", 4, unit="tensors") as bar:
        for _ in range(4):
            bar.advance(1, shard="model.safetensors")
    text = out.getvalue()
    assert "4/4" in text and "━" in text  # rich's bar
    assert "merge  0/4 tensors" not in text  # no plain lines


def test_train_progress_callback_shows_loss_and_eval(tmp_path):
    """The train stage's callback, driven the way the Trainer drives it (log after step end)."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from cpt_kit.train.callbacks import TrainProgress

    console, out = plain_console()
    callback = TrainProgress(console, tokens_per_step=128)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state, control = TrainerState(max_steps=4), TrainerControl()
    callback.on_train_begin(args, state, control)
    for step in range(1, 5):
        state.global_step = step
        control.should_log = True
        callback.on_step_end(args, state, control)
        callback.on_log(args, state, control, logs={"loss": 4.0 - step})
        if step == 4:
            callback.on_log(args, state, control, logs={"eval_loss": 0.5})
    callback.on_train_end(args, state, control)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("  train  0/4 steps")
    assert any("1/4 steps (25%)  loss 3.000" in line for line in lines)
    assert "4/4 steps (100%)" in lines[-1] and "loss 0.000" in lines[-1] and "eval 0.500" in lines[-1]
    assert sum("4/4 steps" in line for line in lines) == 2  # the loss line, then the evaluation at once
    assert "tok/s" in lines[-1]


def test_heartbeat_prints_elapsed_time_for_an_opaque_call():
    import time

    from cpt_kit.progress import progress

    console, out = plain_console()
    with progress(console, "convert F16", None, heartbeat=True, every_seconds=0.05):
        time.sleep(0.3)  # a subprocess, say
    lines = out.getvalue().splitlines()
    assert len(lines) >= 4 and all(line.startswith("  convert F16  elapsed 0:00:00") for line in lines)


def test_task_progress_speaks_rich_task_api_in_plain_lines():
    from rich.progress import Progress as RichProgress

    from cpt_kit.progress import task_progress

    console, out = plain_console()
    with task_progress(console) as tasks:
        reading = tasks.add_task("reading corpus", total=None)
        for _ in range(3):
            tasks.advance(reading)
        tasks.remove_task(reading)
        tokenizing = tasks.add_task("tokenizing corpus", total=50)
        tasks.advance(tokenizing, 50)
    lines = out.getvalue().splitlines()
    assert lines[0] == "  reading corpus  elapsed 0:00:00"
    assert lines[1].startswith("  reading corpus  3  ")
    assert lines[2].startswith("  tokenizing corpus  0/50 (0%)")
    assert lines[-1].startswith("  tokenizing corpus  50/50 (100%)")
    terminal = Console(file=io.StringIO(), force_terminal=True)
    assert isinstance(task_progress(terminal), RichProgress)


def test_merge_reports_every_tensor(tiny_base, tmp_path):
    from safetensors import safe_open
    from test_merge import make_adapter

    from cpt_kit.export.merge import merge_adapter
    from cpt_kit.progress import progress

    adapter = make_adapter(tiny_base, tmp_path / "adapter")
    console, out = plain_console()
    with progress(console, "merge", None, unit="tensors") as bar:
        merge_adapter(tiny_base, adapter, tmp_path / "merged", progress=bar)
    with safe_open(str(tiny_base / "model.safetensors"), framework="pt") as handle:
        n = len(list(handle.keys()))
    lines = out.getvalue().splitlines()
    assert lines[0] == "  merge  elapsed 0:00:00"  # the total is known once the base's index is read
    assert lines[-1].startswith(f"  merge  {n}/{n} tensors (100%)") and len(lines) >= 3
