"""GSM8K two ways.

- "via coding" (program-aided, as the phi-1.5 report scores it): the model writes the body of `def solution()`
  under the question as a docstring; the program runs in the sandbox and its printed result is compared
  numerically with the answer after `####`. Zero-shot by default; --num-fewshot up to 3 adds solved examples.
- chain of thought, 5-shot (the harness's `gsm8k` form the Instruct card reports): "Question: ...\nAnswer: ..."
  exemplars, answers extracted strictly (`#### N`) and flexibly (the last number in the text).
"""
from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

from ..progress import tqdm
from .data import load_split, read_file
from ..sandbox import SandboxPool

PAL_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n\n\n"]
COT_STOPS = ["Question:", "</s>", "<|im_end|>"]
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
HARNESS_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")  # the harness's gsm8k exact_match: removed from both sides


def _asset(name: str) -> Path:
    return Path(str(resources.files("phikit.eval") / "assets" / name))


def bundled_test_items() -> list[dict]:
    """The first GSM8K test problems shipped with phikit (for smoke tests; real runs use --data-dir)."""
    return read_file(_asset("gsm8k_test_head.jsonl"))


def gold_answer(answer: str) -> float:
    return _to_number(answer.split("####")[-1])


def _to_number(text: str) -> float | None:
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(text)
    except ValueError:
        return None


def pal_prompt(question: str, num_fewshot: int = 0) -> str:
    train = read_file(_asset("gsm8k_train_head.jsonl"))
    exemplars = json.loads(_asset("gsm8k_pal_exemplars.json").read_text())
    if num_fewshot > len(exemplars):
        raise ValueError(f"GSM8K via coding has {len(exemplars)} solved examples: use --num-fewshot <= "
                         f"{len(exemplars)}")
    shots = "".join(f'def solution():\n    """{train[e["question_index"]]["question"]}"""\n{e["code"]}\n\n'
                    for e in exemplars[:num_fewshot])
    return f'{shots}def solution():\n    """{question}"""\n'


def pal_program(question: str, completion: str) -> str:
    return f'def solution():\n    """{question}"""\n{completion}\n\nprint(solution())\n'


def cot_prompt(question: str, exemplars: list[dict]) -> str:
    shots = "".join(f"Question: {e['question']}\nAnswer: {e['answer']}\n\n" for e in exemplars)
    return f"{shots}Question: {question}\nAnswer:"


def extract_cot_text(text: str) -> tuple[str | None, str | None]:
    """(strict, flexible) answer strings of a chain-of-thought completion, as the harness's filters pick them."""
    strict = STRICT.search(text)
    matches = [m[0] or m[1] for m in FLEXIBLE.findall(text)]
    return (strict.group(1).strip() if strict else None, matches[-1].strip() if matches else None)


def extract_cot(text: str) -> tuple[float | None, float | None]:
    """(strict, flexible) answers of a chain-of-thought completion, as numbers."""
    return tuple(None if a is None else _to_number(a) for a in extract_cot_text(text))  # type: ignore[return-value]


def harness_exact_match(pred: str | None, answer: str) -> bool:
    """The harness's gsm8k exact_match: strings equal after HARNESS_IGNORE and lower-casing (so "5.00" != "5")."""
    if pred is None:
        return False

    def norm(x: str) -> str:
        for pattern in HARNESS_IGNORE:
            x = re.sub(pattern, "", x)
        return x.lower()
    return norm(pred) == norm(answer)


def same_number(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) <= 1e-4 * max(1.0, abs(b))


def evaluate_gsm8k(model, tokenizer, data_dir=None, limit: int | None = None, mode: str = "pal",
                   num_fewshot: int | None = None, docs: list[dict] | None = None, max_new_tokens: int = 256,
                   batch_size: int = 8, workers: int | None = None) -> dict:
    """mode "pal" (via coding) or "cot" (5-shot chain of thought). docs overrides the test file."""
    from ..inference.decoding import generate
    if docs is None:
        docs = load_split(data_dir, ("gsm8k", "gsm8k/main"), "test", "gsm8k", "openai/gsm8k (main)")
    docs = docs[:limit] if limit else docs
    if mode == "pal":
        k = 0 if num_fewshot is None else num_fewshot
        prompts, stops = [pal_prompt(d["question"], k) for d in docs], PAL_STOPS
    elif mode == "cot":
        k = 5 if num_fewshot is None else num_fewshot
        try:
            pool = load_split(data_dir, ("gsm8k", "gsm8k/main"), "train", "gsm8k", "openai/gsm8k (main)")
        except FileNotFoundError:
            pool = read_file(_asset("gsm8k_train_head.jsonl"))
        if k > len(pool):
            raise ValueError(f"only {len(pool)} training exemplars are available: use --num-fewshot <= {len(pool)}")
        prompts, stops = [cot_prompt(d["question"], pool[:k]) for d in docs], COT_STOPS
    else:
        raise ValueError(f"unknown GSM8K mode {mode!r}: use pal or cot")
    completions: list[str] = []
    for b in tqdm(range(0, len(prompts), batch_size), desc=f"gsm8k ({mode}) generating", unit="batch"):
        completions += generate(model, tokenizer, prompts[b:b + batch_size], max_new_tokens=max_new_tokens,
                                stop=stops, truncate=True)
    records = []
    if mode == "pal":
        with SandboxPool(workers) as sandbox:
            runs = sandbox.run_many([pal_program(d["question"], c) for d, c in zip(docs, completions)], timeout=5.0,
                                    progress=True)
        for d, c, r in zip(docs, completions, runs):
            lines = r.stdout.strip().splitlines()
            pred = _to_number(lines[-1]) if r.passed and lines else None
            gold = gold_answer(d["answer"])
            records.append({"question": d["question"], "completion": c, "pred": pred, "gold": gold,
                            "status": r.status, "correct": float(same_number(pred, gold))})
        metrics = {"accuracy": _mean([r["correct"] for r in records])}
    else:
        for d, c in zip(docs, completions):
            # Scored as the harness scores gsm8k (string match), so numbers compare with lm-eval's.
            strict, flexible = extract_cot_text(c)
            records.append({"question": d["question"], "completion": c, "strict": strict, "flexible": flexible,
                            "gold": gold_answer(d["answer"]),
                            "exact_match_strict": float(harness_exact_match(strict, d["answer"])),
                            "exact_match_flexible": float(harness_exact_match(flexible, d["answer"]))})
        metrics = {"exact_match_strict": _mean([r["exact_match_strict"] for r in records]),
                   "exact_match_flexible": _mean([r["exact_match_flexible"] for r in records])}
    return {"metrics": metrics, "n": len(records), "num_fewshot": k, "mode": mode, "records": records}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
