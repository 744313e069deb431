"""One entry point over every task: `evaluate(model, tokenizer, ["arc_easy", "humaneval"], ...)`."""
from __future__ import annotations

import time

from .multiple_choice import TASKS as MC_TASKS

CODE_TASKS = ("humaneval", "mbpp")
OTHER_TASKS = ("gsm8k", "gsm8k_cot", "perplexity", "toxicity")
ALL_TASKS = tuple(MC_TASKS) + CODE_TASKS + OTHER_TASKS
GROUPS = {"paper": ["winogrande", "arc_easy", "arc_challenge", "boolq", "siqa", "piqa", "hellaswag", "mmlu",
                    "openbookqa", "gsm8k", "humaneval", "mbpp"],
          "truthfulqa": ["truthfulqa_mc1", "truthfulqa_mc2"]}


def expand_tasks(spec: str | list[str]) -> list[str]:
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for n in (x.strip() for x in names if x.strip()):
        for t in GROUPS.get(n, [n]):
            if t not in ALL_TASKS:
                raise ValueError(f"unknown task {t!r}: choose from {', '.join(ALL_TASKS)} (or the groups "
                                 f"{', '.join(GROUPS)})")
            if t not in out:
                out.append(t)
    if not out:
        raise ValueError("no tasks given: pass --tasks, e.g. --tasks arc_easy,hellaswag")
    return out


def _check_options(tasks: list[str], num_fewshot, text_files, toxigen_file, num_samples: int,
                   temperature: float) -> None:
    """Options a later task would reject fail before the first task runs: otherwise hours of earlier tasks were
    lost to, say, `--tasks paper --num-samples 5` without a temperature."""
    if any(t in CODE_TASKS for t in tasks):
        from .code import check_sampling
        check_sampling(num_samples, temperature)
    if "perplexity" in tasks and not text_files:
        raise ValueError("perplexity needs text: pass --text-files FILE [FILE ...] (.txt or .jsonl)")
    if "toxicity" in tasks and not toxigen_file:
        raise ValueError("toxicity needs --toxigen-file FILE (ToxiGen annotated layout, JSONL or Parquet)")
    if num_fewshot:
        for t in tasks:
            if t in MC_TASKS and MC_TASKS[t].fewshot_split is None:
                raise ValueError(f"{t} has no few-shot split: use --num-fewshot 0")
        if "gsm8k" in tasks:
            from .gsm8k import pal_prompt
            pal_prompt("", num_fewshot)  # raises when there are fewer solved examples


def check_task_data(tasks: str | list[str], data_dir=None, limit: int | None = None,
                    num_fewshot: int | None = None) -> None:
    """Read and check every multiple-choice task's records now, so a bad file fails before the model loads."""
    from .multiple_choice import load_docs
    for task in expand_tasks(tasks):
        if task in MC_TASKS:
            load_docs(MC_TASKS[task], data_dir, limit, num_fewshot)


def evaluate(model, tokenizer, tasks: str | list[str], data_dir=None, limit: int | None = None,
             num_fewshot: int | None = None, batch_tokens: int = 8192, text_files: list[str] | None = None,
             toxigen_file: str | None = None, num_samples: int = 1, temperature: float = 0.0,
             workers: int | None = None, model_name: str = "") -> dict:
    from .scoring import LogLikelihoodScorer
    if limit is not None and limit < 1:  # limit=0 would otherwise mean "everything" through `docs[:limit] if limit`
        raise ValueError(f"limit must be >= 1, got {limit}: use None for every item")
    _check_options(expand_tasks(tasks), num_fewshot, text_files, toxigen_file, num_samples, temperature)
    scorer = LogLikelihoodScorer(model, batch_tokens=batch_tokens)
    results: dict = {"model": model_name, "tasks": {}, "config": {"limit": limit, "num_fewshot": num_fewshot,
                                                                  "data_dir": str(data_dir) if data_dir else None}}
    for task in expand_tasks(tasks):
        start = time.perf_counter()
        if task in MC_TASKS:
            from .multiple_choice import evaluate_task
            res = evaluate_task(MC_TASKS[task], scorer, tokenizer, data_dir, limit, num_fewshot)
        elif task in CODE_TASKS:
            from .code import evaluate_code
            res = evaluate_code(task, model, tokenizer, data_dir, limit, num_samples=num_samples,
                                temperature=temperature, workers=workers)
        elif task in ("gsm8k", "gsm8k_cot"):
            from .gsm8k import evaluate_gsm8k
            res = evaluate_gsm8k(model, tokenizer, data_dir, limit, mode="pal" if task == "gsm8k" else "cot",
                                 num_fewshot=num_fewshot, workers=workers)
        elif task == "perplexity":
            from .perplexity import evaluate_perplexity, read_documents
            res = evaluate_perplexity(model, tokenizer, read_documents(text_files)[:limit] if limit
                                      else read_documents(text_files))
        else:
            from .toxicity import evaluate_toxicity
            res = evaluate_toxicity(model, tokenizer, toxigen_file, limit)
        res["seconds"] = time.perf_counter() - start
        results["tasks"][task] = res
    return results
