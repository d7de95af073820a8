"""The report's figures (matplotlib, Agg backend: no display needed), built from run files only.

`figures(facts)` returns {file stem: Figure}; a figure is made only when its data exists (a run
without replay has no forgetting bars, a CPT run no safety chart).
"""

from __future__ import annotations

from typing import Any

from cpt_kit.report.facts import Facts

PLOT_CAPTIONS = {
    "loss": "Training loss per step and held-out loss at each evaluation",
    "learning_rate": "Learning rates: LoRA adapters and embed_tokens/lm_head",
    "throughput": "Training throughput (tokens/s) and memory",
    "perplexity": "Perplexity: base vs trained (held-out and replay text), the merged HF model and each exported GGUF",
    "data": "Documents (conversations for a chat recipe) kept, and dropped by reason",
    "safety": "Safety probe pass rate per category (HF model and exported GGUF)",
}
"""Each figure's caption, in the order the figures are made (loss first)."""


def figures(facts: Facts) -> dict[str, Any]:
    """{stem: Figure} in PLOT_CAPTIONS' order."""
    import matplotlib
    matplotlib.use("Agg")

    made = {}
    for name, build in (("loss", _loss), ("learning_rate", _learning_rates), ("throughput", _throughput),
                        ("perplexity", _perplexity), ("data", _data), ("safety", _safety)):
        figure = build(facts)
        if figure is not None:
            made[name] = figure
    return made


def _figure(title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig, ax


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _loss(facts: Facts):
    steps, loss = _series(facts.train_log, "loss")
    if not steps:
        return None
    fig, ax = _figure("Loss")
    ax.plot(steps, loss, label="training loss")
    eval_steps, eval_loss = _series(facts.train_log, "eval_loss")
    if eval_steps:
        ax.plot(eval_steps, eval_loss, marker="o", label="held-out loss")
    ax.set_xlabel("step")
    ax.legend()
    return fig


def _learning_rates(facts: Facts):
    steps, lr = _series(facts.train_log, "learning_rate")
    if not steps:
        return None
    fig, ax = _figure("Learning rates")
    ax.plot(steps, lr, label="LoRA")
    embed_steps, embed_lr = _series(facts.train_log, "embedding_learning_rate")
    if embed_steps:
        ax.plot(embed_steps, embed_lr, label="embed_tokens / lm_head")
    ax.set_xlabel("step")
    ax.legend()
    return fig


def _throughput(facts: Facts):
    steps, tps = _series(facts.train_log, "tokens_per_second")
    if not steps:
        return None
    fig, ax = _figure("Throughput and memory")
    ax.plot(steps, tps, color="tab:blue", label="tokens/s")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s")
    mem_steps, mem = _series(facts.train_log, "memory_mb")
    if mem_steps:
        twin = ax.twinx()
        twin.plot(mem_steps, mem, color="tab:orange", label="memory MiB")
        twin.set_ylabel("memory (MiB)")
    fig.legend(loc="outside lower center", ncols=2)
    return fig


def _perplexity(facts: Facts):
    bars = facts.perplexity_bars()
    if not bars:
        return None
    fig, ax = _figure("Perplexity (lower is better)")
    labels = [label for label, _ in bars]
    colours = ["tab:orange" if label.startswith("replay") else "tab:blue" if label.startswith(("merged", "GGUF"))
               else "tab:green" for label in labels]  # held-out text / replay text / verify's blocks
    drawn = ax.bar(labels, [value for _, value in bars], color=colours)
    ax.bar_label(drawn, labels=[f"{value:.4g}" for _, value in bars], padding=2, fontsize=8)
    ax.set_yscale("log")
    ax.tick_params(axis="x", labelrotation=30)
    return fig


def _data(facts: Facts):
    counts = facts.document_counts()
    if not counts:
        return None
    fig, ax = _figure(f"{facts.unit.capitalize()} kept, and dropped by reason")
    labels = ["kept"] + [f"dropped: {reason}" for reason in list(counts)[1:]]
    bars = ax.barh(labels, list(counts.values()), color=["tab:green"] + ["tab:red"] * (len(counts) - 1))
    ax.bar_label(bars, labels=[f"{n:,}" for n in counts.values()], padding=3)
    ax.invert_yaxis()  # kept on top, the reasons below in prepare's order
    ax.set_xlabel(facts.unit)
    return fig


def _safety(facts: Facts):
    rates = facts.safety_rates()
    if not rates:
        return None
    fig, ax = _figure("Safety probe: pass rate per category")
    for i, (model, per_category) in enumerate(rates.items()):
        positions = [k + i * 0.4 for k in range(len(per_category))]
        drawn = ax.bar(positions, list(per_category.values()), width=0.4, label=model)
        ax.bar_label(drawn, labels=[f"{rate:.0%}" for rate in per_category.values()], padding=2, fontsize=7)
    first = next(iter(rates.values()))
    ax.set_xticks([k + 0.2 for k in range(len(first))], list(first), rotation=30, ha="right")
    ax.set_ylim(0, 1.1)  # room for the labels above a 100% bar
    ax.legend()
    return fig
