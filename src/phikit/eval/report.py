"""Results: JSON with every per-item record, a markdown table, and the phi-1.5 report's numbers beside ours."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..files import write_text_atomic

# Tables 2-4 of "Textbooks Are All You Need II" (phi-1.5 technical report): zero-shot acc (MMLU 2-shot),
# GSM8K via coding and HumanEval/MBPP pass@1 in percent there, stored here as fractions.
PAPER: dict[str, dict[str, float]] = {
    "phi-1.5": {"winogrande": 0.734, "arc_easy": 0.756, "arc_challenge": 0.444, "boolq": 0.758, "siqa": 0.526,
                "piqa": 0.766, "hellaswag": 0.476, "mmlu": 0.376, "openbookqa": 0.372, "gsm8k": 0.402,
                "humaneval": 0.341, "mbpp": 0.377},
    "phi-1.5-web": {"winogrande": 0.740, "arc_easy": 0.761, "arc_challenge": 0.449, "boolq": 0.728, "siqa": 0.530,
                    "piqa": 0.770, "hellaswag": 0.484, "mmlu": 0.379, "openbookqa": 0.360, "gsm8k": 0.446,
                    "humaneval": 0.414, "mbpp": 0.435},
    "phi-1.5-web-only": {"winogrande": 0.604, "arc_easy": 0.666, "arc_challenge": 0.329, "boolq": 0.632,
                         "siqa": 0.414, "piqa": 0.743, "hellaswag": 0.478, "mmlu": 0.309, "openbookqa": 0.274,
                         "humaneval": 0.172, "mbpp": 0.273},
}
HEADLINE = {"gsm8k": "accuracy", "gsm8k_cot": "exact_match_flexible", "humaneval": "pass@1", "mbpp": "pass@1",
            "perplexity": "perplexity", "toxicity": "safety_score", "truthfulqa_mc2": "acc"}


def paper_model(name: str) -> str | None:
    """The report's row for a model name or path (phi-1_5, microsoft/phi-1_5, phi-1.5-web ...), else None."""
    key = name.lower().rstrip("/").split("/")[-1].replace("_", ".")
    for row in sorted(PAPER, key=len, reverse=True):
        if key.startswith(row) or key == row:
            return row
    return None


def headline(task: str, metrics: dict) -> tuple[str, float]:
    name = HEADLINE.get(task, "acc")
    return name, metrics.get(name, float("nan"))


def markdown_table(results: dict) -> str:
    lines = ["| task | n | metric | value | ± |", "|---|---|---|---|---|"]
    for task, res in results["tasks"].items():
        name, value = headline(task, res["metrics"])
        err = res["metrics"].get(f"{name}_stderr")
        lines.append(f"| {task} | {res['n']} | {name} | {value:.4f} | {'' if err is None else f'{err:.4f}'} |")
        for m, v in res["metrics"].items():
            if m != name and not m.endswith("_stderr") and isinstance(v, float):
                lines.append(f"| | | {m} | {v:.4f} | |")
    return "\n".join(lines)


def paper_table(results: dict, row: str) -> str:
    lines = [f"| task | phikit | {row} (paper) | difference |", "|---|---|---|---|"]
    for task, res in results["tasks"].items():
        if task in PAPER[row]:
            _, ours = headline(task, res["metrics"])
            ref = PAPER[row][task]
            lines.append(f"| {task} | {ours:.3f} | {ref:.3f} | {ours - ref:+.3f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def write_report(results: dict, output: str | Path) -> tuple[Path, Path]:
    """results.json (everything, per-item records included) and a markdown report beside it."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    md = "# Evaluation\n\n" + f"model: `{results.get('model')}`\n\n" + markdown_table(results) + "\n"
    row = paper_model(str(results.get("model", "")))
    if row:
        table = paper_table(results, row)
        if table:
            md += f"\n## Beside the phi-1.5 report (Tables 2-4)\n\n{table}\n"
    md_path = output.with_suffix(".md")
    write_text_atomic(output, json.dumps(_finite(results), indent=1) + "\n", "eval-results")
    write_text_atomic(md_path, md, "eval-report")
    return output, md_path


def _finite(obj):
    """JSON has no NaN: write null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
