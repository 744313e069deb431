"""report.md for a speedrun: the numbers, loss curves (PNG), samples in each prompt format, timing and cost."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .files import staged_file, write_text_atomic

METRIC_NAMES = {
    "arithmetic_easy_accuracy": "held-out easy arithmetic accuracy (numbers to 10, 1-2 operations)",
    "arithmetic_easy_1op_accuracy": "&nbsp;&nbsp;one operation",
    "arithmetic_easy_multi_op_accuracy": "&nbsp;&nbsp;two operations",
    "arithmetic_accuracy": "held-out arithmetic accuracy (numbers to 60, 1-3 operations)",
    "arithmetic_1op_accuracy": "&nbsp;&nbsp;one operation",
    "arithmetic_multi_op_accuracy": "&nbsp;&nbsp;two or three operations",
    "word_problem_accuracy": "held-out word-problem accuracy (phrasings seen in training)",
    "word_problem_new_phrasing_accuracy": "held-out word-problem accuracy (phrasings training never saw)",
    "code_pass@1": "held-out code pass@1 (sandbox)",
    "mc_accuracy": "arithmetic multiple choice (4-way, log-likelihood)",
    "heldout_perplexity": "held-out perplexity",
}


def plot_losses(run_dirs: dict[str, Path], out_png: Path) -> Path | None:
    """Training (and held-out, when logged) loss against step, one panel per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .train.report import read_metrics
    series = {name: read_metrics(d) for name, d in run_dirs.items()}
    series = {k: v for k, v in series.items() if any("loss" in r for r in v)}
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 3.8), squeeze=False)
    for ax, (name, rows) in zip(axes[0], series.items()):
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r and "step" in r]
        if train:
            ax.plot(*zip(*train), label="train", lw=1.2)
        if val:
            ax.plot(*zip(*val), "o-", label="held-out", lw=1.5)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with staged_file(out_png) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return out_png


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if v < 100 else f"{v:.1f}"
    return "-" if v is None else str(v)


def above_baseline_p(trained: list[int], baseline: list[int]) -> float:
    """One-sided Fisher exact p-value that the trained model's accuracy (correct, total) beats the baseline's by
    more than chance: small p means clearly above."""
    from scipy.stats import fisher_exact
    (a, n), (b, m) = trained, baseline
    return float(fisher_exact([[a, n - a], [b, m - b]], alternative="greater")[1])


def baseline_lines(ev: dict[str, dict]) -> list[str]:
    """One line per held-out task: the best trained model against the untrained one, with the exact test."""
    lines = []
    for kind, name in (("arithmetic_easy", "easy arithmetic"), ("arithmetic", "arithmetic"),
                       ("word_problem", "word problems"),
                       ("word_problem_new_phrasing", "word problems in new phrasings")):
        base = ev.get("untrained", {}).get(f"{kind}_counts")
        trained = [(c, ev[c][f"{kind}_counts"]) for c in ("pretrained", "sft") if f"{kind}_counts" in ev.get(c, {})]
        if not base or not trained:
            continue
        stage, (a, n) = max(trained, key=lambda t: t[1][0] / max(1, t[1][1]))
        p = above_baseline_p([a, n], base)
        verdict = "clearly above the baseline" if p < 0.01 else "above the baseline" if p < 0.05 else \
            "not distinguishable from the baseline"
        lines.append(f"- {name}: {stage} {a}/{n} against untrained {base[0]}/{base[1]}; one-sided Fisher exact "
                     f"p = {p:.2g}: {verdict}")
    return lines


def write_report(out: Path, results: dict[str, dict], minutes: float, elapsed: float) -> Path:
    out = Path(out)
    lines = ["# phikit speedrun report", ""]
    plan = json.loads((out / "speedrun.json").read_text()) if (out / "speedrun.json").exists() else {}
    lines += [f"Preset `{plan.get('preset', '?')}`, budget {minutes:g} min, seed {plan.get('seed', 0)}.", ""]

    ev = results.get("eval", {}).get("scores", {})
    if ev:
        cols = [c for c in ("untrained", "pretrained", "sft") if c in ev]
        lines += ["## Results", "", "| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for key, label in METRIC_NAMES.items():
            if any(key in ev[c] for c in cols):
                lines.append(f"| {label} | " + " | ".join(_fmt(ev[c].get(key)) for c in cols) + " |")
        lines += ["", "`untrained`: the same architecture at random initialization (the baseline); `pretrained`: "
                  "after pretraining on the textbook corpus, prompted in the QA format; `sft`: after ChatML "
                  "instruction tuning, asked as a chat.", ""]
        tests = baseline_lines(ev)
        if tests:
            lines += ["Against the untrained baseline (held-out exercises, greedy, exact answer):", ""] + tests + [""]

    runs = {"pretrain": out / "pretrain", "sft": out / "sft-run"}
    png = plot_losses({k: v for k, v in runs.items() if v.exists()}, out / "loss.png")
    if png:
        lines += ["## Loss curves", "", "![loss curves](loss.png)", ""]

    abl = results.get("ablation", {}).get("arms")
    if abl:
        lines += ["## Ablation: textbook data vs an unfiltered web-like mix (same steps, same model)", "",
                  "| training data | steps | tokens | held-out perplexity | easy arithmetic acc | arithmetic acc | "
                  "word-problem acc | code pass@1 | MC acc |", "|---|---|---|---|---|---|---|---|---|"]
        for name, r in abl.items():
            lines.append(f"| {name} | {r.get('steps')} | {r.get('tokens')} | {_fmt(r.get('heldout_perplexity'))} | "
                         f"{_fmt(r.get('arithmetic_easy_accuracy'))} | {_fmt(r.get('arithmetic_accuracy'))} | "
                         f"{_fmt(r.get('word_problem_accuracy'))} | {_fmt(r.get('code_pass@1'))} | "
                         f"{_fmt(r.get('mc_accuracy'))} |")
        lines += ["", "Held-out perplexity is measured on the held-out exercises (questions with their worked "
                  "solutions): how well each model predicts textbook-quality solutions it never saw.", ""]

    chats = results.get("eval", {}).get("transcript")
    if chats:
        lines += ["## Talk to it", "", "The chat model's greedy answers to a short script: each exchange is a fresh "
                  "chat, except the follow-up, which continues the word problem before it.", ""]
        for messages in chats:
            lines.append("```text")
            for m in messages:
                label = "user:  " if m["role"] == "user" else "model: "
                lines += [label + m["content"].replace("\n", "\n" + " " * len(label)), ""]
            lines[-1] = "```"
            lines.append("")

    samples = results.get("eval", {}).get("samples", {})
    if samples:
        lines += ["## Samples in each prompt format (greedy)", ""]
        for name, s in samples.items():
            lines += [f"**{name}**", "", "```", s["prompt"] + s["completion"], "```", ""]

    data = results.get("data", {})
    if data:
        lines += ["## Data", "",
                  f"- documents generated: {data.get('documents')}, kept after dedup and decontamination: "
                  f"{data.get('kept')}",
                  f"- dedup: {json.dumps(data.get('dedup'))}", f"- decontamination: {json.dumps(data.get('decontaminate'))}"]
        pk = results.get("pack", {})
        if pk:
            lines.append(f"- tokens: {pk.get('train_tokens')} train, {pk.get('val_tokens')} held-out")
        tok = results.get("tokenizer", {})
        if tok:
            lines.append(f"- tokenizer: {tok.get('kind')} with {tok.get('vocab')} tokens")
        lines.append("")

    lines += ["## Timing and cost", "", "| stage | seconds |", "|---|---|"]
    total = 0.0
    for stage, r in results.items():
        if "seconds" in r:
            lines.append(f"| {stage} | {r['seconds']:.0f} |")
            total += r["seconds"]
    cores = os.cpu_count() or 1
    lines += [f"| total | {total:.0f} |", "",
              f"Compute: {total * cores / 3600:.2f} core-hours on {cores} CPU cores "
              f"(this invocation: {elapsed:.0f} s wall).", ""]
    pre = results.get("pretrain", {})
    if pre:
        lines += [f"Pretraining: {pre.get('steps')} steps, {pre.get('tokens')} tokens, "
                  f"{_fmt(pre.get('tokens_per_second'))} tokens/s, final loss {_fmt(pre.get('final_loss'))}.", ""]

    lines += ["## Use the model", "", "```bash",
              f"phikit chat --model {out / 'model-chat'}",
              f"phikit serve --model {out / 'model-chat'} --port 8000",
              f"phikit generate --model {out / 'model-base'} --prompt 'Question: What is 12 + 7?' --format code",
              "```", ""]
    report = out / "report.md"
    write_text_atomic(report, "\n".join(lines))
    return report
